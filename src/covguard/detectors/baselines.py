"""Registry of the standard baselines (OpenOOD v1.5 postprocessors): name -> detector class."""

from __future__ import annotations

from covguard.detectors.base import Detector
from covguard.detectors.energy import Energy
from covguard.detectors.gen import GEN
from covguard.detectors.knn import KNN
from covguard.detectors.max_logit import MaxLogit
from covguard.detectors.mds import MDS
from covguard.detectors.msp import MSP
from covguard.detectors.odin import ODIN
from covguard.detectors.react import ReAct
from covguard.detectors.rmds import RMDS
from covguard.detectors.vim import ViM

__all__ = ["BASELINES"]

BASELINES: dict[str, type[Detector]] = {
    "msp": MSP,
    "max_logit": MaxLogit,
    "energy": Energy,
    "odin": ODIN,
    "gen": GEN,
    "mds": MDS,
    "rmds": RMDS,
    "knn": KNN,
    "vim": ViM,
    "react": ReAct,
}
