"""Load a checkpoint's processor, also on a machine without torchvision.

``AutoProcessor.from_pretrained`` fails without torchvision for every processor that carries a video
processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL, SmolVLM, ...): transformers' video
processors are torchvision-only, ``AutoVideoProcessor`` refuses to load, and ``ProcessorMixin.__init__`` checks
every sub-processor against ``VideoProcessorMixin``, a class transformers does not export without torchvision.
We train on images only, so there ``load_processor`` builds the processor without its video part
(``processor.video_processor is None``); image processors fall back to their PIL backend by themselves.
One processor is gated on torchvision as a whole: ``PixtralProcessor`` (Mistral 3) imports a helper from the
torchvision image processor's module, though the PIL one defines the same function; ``processor_class`` imports
it against the PIL module. With torchvision installed ``load_processor`` is a plain ``AutoProcessor.from_pretrained``.

    from distill.models.processors import load_processor
    processor = load_processor("runs/demo/teacher")

A processor built without its video part also needs ``image_only_processors()`` around ``save_pretrained``
(transformers' save iterates over every sub-processor, ``None`` included). And SmolVLM's ``apply_chat_template``
reads its video processor's frame defaults before rendering: render with
``ProcessorMixin.apply_chat_template(processor, messages, ...)``, which is what its override calls.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoProcessor, ProcessorMixin
from transformers.utils import is_torchvision_available

log = logging.getLogger(__name__)


def has_torchvision() -> bool:
    """Whether torchvision is importable (transformers' own check)."""
    return is_torchvision_available()


def _video_attributes(processor_class: type[ProcessorMixin]) -> list[str]:
    return [name for name in processor_class.get_attributes() if "video" in name]


@contextmanager
def image_only_processors() -> Iterator[None]:
    """While active, every processor class has no video sub-processor: it constructs, loads and saves without one.

    transformers derives a processor's sub-processors from ``ProcessorMixin.get_attributes()`` (the modality
    names in its ``__init__`` signature) everywhere: loading them (``_resolve_subprocessors`` in 5.25,
    ``_get_arguments_from_pretrained`` in 5.17), the count and class checks of ``ProcessorMixin.__init__`` (the
    ``video_processor=None`` a processor passes on is dropped by its ``zip`` with the attributes) and
    ``save_pretrained``. So the video attributes are filtered out of that classmethod. Some processors (SmolVLM,
    Gemma 4) take ``video_processor`` without a default; ``get_processor_dict`` (the saved init arguments, read
    before any sub-processor is loaded) then sets it to ``None``, so it reaches the constructor and nothing else.
    Both classmethods are put back on exit. Not thread-safe: it patches the base class.
    """
    original_attributes = ProcessorMixin.__dict__["get_attributes"]
    original_processor_dict = ProcessorMixin.__dict__["get_processor_dict"]

    def get_attributes(cls: type[ProcessorMixin]) -> list[str]:
        return [name for name in original_attributes.__func__(cls) if "video" not in name]

    def get_processor_dict(cls: type[ProcessorMixin], *args: Any, **kwargs: Any) -> tuple[dict[str, Any], dict]:
        processor_dict, unused = original_processor_dict.__func__(cls, *args, **kwargs)
        for name in original_attributes.__func__(cls):
            if "video" in name:
                processor_dict[name] = None
        return processor_dict, unused

    ProcessorMixin.get_attributes = classmethod(get_attributes)
    ProcessorMixin.get_processor_dict = classmethod(get_processor_dict)
    try:
        yield
    finally:
        ProcessorMixin.get_attributes = original_attributes
        ProcessorMixin.get_processor_dict = original_processor_dict


def without_video(processor: ProcessorMixin) -> ProcessorMixin:
    """Set the video attributes a processor built under ``image_only_processors`` never set to ``None``, so that
    code reading ``processor.video_processor`` (``model_input_names``, kwargs merging) sees "no video processor"."""
    for name in _video_attributes(type(processor)):
        if not hasattr(processor, name):
            setattr(processor, name, None)
    return processor


# Processor classes whose module imports a helper from ``image_processing_<model>`` (torchvision) where
# ``image_processing_pil_<model>`` defines the same function: transformers gates the whole class on torchvision.
_PIL_TWINS = {"PixtralProcessor": "pixtral"}


def processor_class(name: str) -> type[ProcessorMixin]:
    """A processor class by name; ``PixtralProcessor`` also without torchvision."""
    cls = getattr(transformers, name)
    if not getattr(cls, "is_dummy", False) or name not in _PIL_TWINS:
        return cls
    package = f"transformers.models.{_PIL_TWINS[name]}"
    torchvision_module = f"{package}.image_processing_{_PIL_TWINS[name]}"
    # For the one import of the processor's module, its torchvision image-processing module resolves to the PIL
    # one; the alias is removed at once (the processor module keeps the PIL helper, the same function).
    sys.modules[torchvision_module] = importlib.import_module(f"{package}.image_processing_pil_{_PIL_TWINS[name]}")
    try:
        return getattr(importlib.import_module(f"{package}.processing_{_PIL_TWINS[name]}"), name)
    finally:
        del sys.modules[torchvision_module]


def _saved_processor_class(path: Path) -> str | None:
    config = path / "processor_config.json"
    return json.loads(config.read_text()).get("processor_class") if config.is_file() else None


def load_processor(path: str | Path) -> ProcessorMixin:
    """The processor saved in a local checkpoint folder; without torchvision, without its video part."""
    if has_torchvision():
        return AutoProcessor.from_pretrained(path)
    name = _saved_processor_class(Path(path))
    with image_only_processors():
        if name in _PIL_TWINS:
            processor = processor_class(name).from_pretrained(path)
        else:
            processor = AutoProcessor.from_pretrained(path)
    if _video_attributes(type(processor)):
        log.info("%s loaded without its video processor (torchvision is not installed)", type(processor).__name__)
    return without_video(processor)
