import os

# Before torch loads OpenMP: idle threads sleep instead of spinning (10x slower steps on a busy 2-core machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
