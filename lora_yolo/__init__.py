"""lora-yolo: LoRA fine-tuning for Ultralytics YOLO models (detect, segment, pose, obb, classify, semantic, depth).

The library behind the `lora-yolo` command; every command is one call here.
"""

# isort: off
from lora_yolo.compat import require_ultralytics

require_ultralytics()  # first: the imports below use Ultralytics names that older versions lack
# isort: on

from lora_yolo.adapter import Adapter, attach_adapter, extract_adapter, fingerprint, load_adapter, save_adapter
from lora_yolo.checkpoint import load_model, save_checkpoint
from lora_yolo.config import LoraConfig
from lora_yolo.errors import LoraYoloError
from lora_yolo.inject import add_lora, lora_layers, lora_state_dict, merge_lora
from lora_yolo.inspect import inspect_model
from lora_yolo.layer import LoraConv2d
from lora_yolo.peft_format import from_peft, to_peft
from lora_yolo.serve import AdapterModel
from lora_yolo.targets import describe_convs, select_targets

__version__ = "0.1.0"
__all__ = [
    "Adapter",
    "AdapterModel",
    "LoraConfig",
    "LoraConv2d",
    "LoraYoloError",
    "add_lora",
    "attach_adapter",
    "describe_convs",
    "extract_adapter",
    "fingerprint",
    "from_peft",
    "inspect_model",
    "load_adapter",
    "load_model",
    "lora_layers",
    "lora_state_dict",
    "merge_lora",
    "save_adapter",
    "save_checkpoint",
    "select_targets",
    "to_peft",
]
