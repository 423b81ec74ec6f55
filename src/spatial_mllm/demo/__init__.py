"""The demo: the whole LLaVA recipe on the built-in spatial world, as a user of the library would write it.

`world/` generates the world (scenes, images, LLaVA-format text), `tokenizer.py` trains its tokenizer,
`pretrain_vision.py` / `pretrain_llm.py` make its encoders, `plan.py` holds the run's settings and `run.py`
trains, evaluates and compares the projectors; `commands.py` is `spatial-mllm demo`.
"""

from .plan import DEFAULT, DEMO_PROJECTORS, QUICK, DemoPlan, StagePlan
from .run import run_demo

__all__ = ["DEFAULT", "DEMO_PROJECTORS", "DemoPlan", "QUICK", "StagePlan", "run_demo"]
