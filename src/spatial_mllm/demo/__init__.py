"""The demo: the whole LLaVA recipe on the built-in spatial world, as a user of the library would write it.

`world/` generates the world (scenes, images, LLaVA-format text), `encoders/` makes and ships its ViT and LLM
(`tokenizer.py` trains the plain world tokenizer that tests and `data tokenizer` use), `plan.py` holds the run's
settings and `run.py` trains, evaluates and compares the projectors with the blind control and the text ceiling;
`commands.py` is `spatial-mllm demo` and `spatial-mllm world-encoders`.
"""

from .plan import DEFAULT, DEMO_PROJECTORS, QUICK, DemoPlan, StagePlan
from .run import run_demo

__all__ = ["DEFAULT", "DEMO_PROJECTORS", "DemoPlan", "QUICK", "StagePlan", "run_demo"]
