"""The model zoo: one model per file, all sharing `base.CTRModel` (features, tables, tower)."""

from fin.models.base import CTRModel, ModelConfig
from fin.models.din import DIN
from fin.models.dnn import DNN
from fin.models.fin import FIN
from fin.models.sim import SIM

MODELS: dict[str, type[CTRModel]] = {"fin": FIN, "din": DIN, "sim": SIM, "dnn": DNN}

__all__ = ["MODELS", "CTRModel", "ModelConfig", "FIN", "DIN", "SIM", "DNN"]
