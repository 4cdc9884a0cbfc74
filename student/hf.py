"""The student as a transformers model: `GooseConfig` and `GooseForCausalLM` (AutoConfig / AutoModelForCausalLM).

`GooseForCausalLM` wraps the `Student` of model.py unchanged; nothing about the network is defined here.
`generate()` runs the prompt through the chunked form once, then one token per step through the recurrent
form, with the student's state (O(1) per layer) as the generation cache. The state travels under the
keyword `state` (the name transformers already knows from its own RWKV model), not as a key/value Cache:
there is nothing to crop or grow, and beam search reorders it with `_reorder_cache`.

`goose export` (pipeline/export.py) copies this file, model.py, spikes.py, wkv.py and errors.py into the
exported folder with their relative imports rewritten, so that folder loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` where goose is not installed. Keep
this file's imports to the standard library, torch, transformers and those sibling modules (ternary.py
and native.py travel too: `use_ternary_path()`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .model import Student, StudentConfig

MODEL_TYPE = "goose-rwkv7-spiking"
STUDENT_FIELDS = tuple(f.name for f in dataclasses.fields(StudentConfig))


class GooseConfig(PretrainedConfig):
    """The StudentConfig fields, flat at the top level of config.json, plus the usual transformers keys."""

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer"}

    def __init__(self, **kwargs):
        defaults = StudentConfig().to_dict()
        student = {name: kwargs.pop(name, defaults[name]) for name in STUDENT_FIELDS}
        # the Student ties its output layer to the embedding itself; transformers must not tie anything
        kwargs["tie_word_embeddings"] = False
        use_cache = kwargs.pop("use_cache", True)  # forward returns the state (transformers 5 drops this key)
        super().__init__(**kwargs)
        for name, value in student.items():  # after super(): its dataclass __init__ would reset shared names
            setattr(self, name, value)
        self.use_cache = use_cache

    def student_config(self) -> StudentConfig:
        return StudentConfig.from_dict({name: getattr(self, name) for name in STUDENT_FIELDS})

    @classmethod
    def from_student_config(cls, cfg: StudentConfig, **kwargs) -> "GooseConfig":
        return cls(**cfg.to_dict(), **kwargs)


@dataclass
class GooseCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: list | None = None  # the student's state after the last token: pass it back as `state=`
    hidden_states: tuple | None = None


def map_state(state, fn):
    """Apply fn to every tensor of a (nested list/dict) student state."""
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    if isinstance(state, list):
        return [map_state(v, fn) for v in state]
    return fn(state)


class GooseForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = GooseConfig
    base_model_prefix = "student"
    main_input_name = "input_ids"
    _is_stateful = True  # a recurrent state cannot be rolled back: transformers refuses assisted decoding
    _supports_cache_class = False  # transformers 4.x: no DynamicCache for this model

    def __init__(self, config: GooseConfig):
        super().__init__(config)
        self.student = Student(config.student_config())
        self.post_init()

    def _init_weights(self, module):
        """The Student initialises its own weights (RWKV-7 init); transformers' generic init must not."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is the cache; transformers must not create a key/value cache

    @classmethod
    def from_student(cls, student: Student, **config_kwargs) -> "GooseForCausalLM":
        """The same weights (copied) as a transformers model; config_kwargs: eos_token_id and the like."""
        model = cls(GooseConfig.from_student_config(student.cfg, **config_kwargs))
        model.student.load_state_dict(student.state_dict())
        return model.to(student.emb.weight.device).eval()

    def use_ternary_path(self) -> "GooseForCausalLM":
        """Run on the ternary inference path from here on (ternary.py: packed 2-bit weights, only fired spikes'
        weight rows read; CPU, fp32, inference only; needs ternary_weights). The same logits up to float
        summation order. Its C kernels are built by the machine's C compiler on first use."""
        from .ternary import ternary_student

        self.student = ternary_student(self.student)
        return self

    def get_input_embeddings(self):
        return self.student.emb

    def set_input_embeddings(self, value):
        self.student.emb = value

    def get_output_embeddings(self):
        return self.student.head  # None when tied: the Student multiplies by the embedding itself

    def forward(self, input_ids: torch.LongTensor | None = None, state: list | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, mode: str | None = None, **kwargs):
        """input_ids (B, T), optionally the state after earlier tokens -> logits (B, T, V) and the new state.

        mode: None picks the recurrent form for one token after a state (generation) and the chunked form
        otherwise, as `goose generate` does; "chunked" or "recurrent" forces one (same weights, same result
        up to float rounding)."""
        if input_ids is None:
            raise ValueError("GooseForCausalLM needs input_ids (inputs_embeds is not supported)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding is not supported: the recurrent state would read the pad tokens; pass "
                             "prompts of equal length, or one prompt at a time")
        if mode is None:
            mode = "recurrent" if state is not None and input_ids.shape[1] == 1 else "chunked"
        out = self.student(input_ids, state, mode=mode, output_hidden_states=bool(output_hidden_states))
        loss = None
        if labels is not None:  # next-token loss: labels are the inputs, shifted here
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        result = GooseCausalLMOutput(loss=loss, logits=out.logits, state=out.state if use_cache else None,
                                     hidden_states=tuple(out.hidden_states) if output_hidden_states else None)
        return result if return_dict is not False else result.to_tuple()

    # ---- generation: the state as the cache ----------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, state=None, attention_mask=None, use_cache=None, **kwargs):
        # with a state, every token but the newest is already in it: feed that one (recurrent form); on the
        # first call of generate (a state the caller passed in) the inputs are all new
        if state is not None and not kwargs.get("is_first_iteration"):
            input_ids = input_ids[:, -1:]
        inputs = {"input_ids": input_ids, "state": state, "attention_mask": attention_mask, "use_cache": use_cache}
        if kwargs.get("output_hidden_states") is not None:
            inputs["output_hidden_states"] = kwargs["output_hidden_states"]
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        if "state" in outputs:  # ModelOutput: only fields that are set
            model_kwargs["state"] = outputs.state
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)

    @staticmethod
    def _reorder_cache(state, beam_idx):
        """Beam search: each beam continues from the state of the beam it was chosen from."""
        return map_state(state, lambda t: t.index_select(0, beam_idx.to(t.device)))


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know the model type (idempotent)."""
    AutoConfig.register(MODEL_TYPE, GooseConfig, exist_ok=True)
    AutoModelForCausalLM.register(GooseConfig, GooseForCausalLM, exist_ok=True)


if __name__.startswith("goose."):  # goose's own copy; an exported copy is registered by transformers itself
    register()
