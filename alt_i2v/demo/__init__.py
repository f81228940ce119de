"""The demo: a generated illustration-like dataset (:mod:`alt_i2v.data.synthetic`) and the whole pipeline
run on it offline (:mod:`.run`)."""

from .run import FULL, QUICK, DemoResult, DemoSettings, run_demo
from ..data.synthetic import COUNT_TAGS, MARKER, draw_demo_image, generate_demo_dataset

__all__ = ["run_demo", "generate_demo_dataset", "draw_demo_image", "DemoResult", "DemoSettings", "FULL", "QUICK",
           "COUNT_TAGS", "MARKER"]
