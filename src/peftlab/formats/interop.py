"""Adapters in the Hugging Face ``peft`` layout (adapter_config.json + adapter_model.safetensors), both ways.

The methods both libraries share move across: LoRA, (IA)3, VeRA, FourierFT, LoHa, LoKr, OFT, BOFT, HRA, prefix
tuning and prompt tuning, each with the trained task head (peft's ``modules_to_save``). peftlab keeps a module per
(layer, site); peft keys tensors by the backbone module they change, and the anatomy maps one onto the other.
Nothing here imports peft.

Prefix tuning differs in one convention: peft hands prefixes to the model as past key/values, so the
input's positions start after the prefix; in peftlab they start at 0. For rotary models (Llama family)
that is an exact change of basis, and the keys are rotated on the way across. For absolute position
embeddings (BERT, RoBERTa, GPT-2) it cannot be compensated: the tensors are converted exactly, a warning
says that outputs will differ.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from peftlab.backbone.anatomy import Block, LinearRef, anatomy_for, find_blocks, find_head, find_suffix, stack_names
from peftlab.core.spec import Spec
from peftlab.errors import AdapterLoadError, PeftlabError
from peftlab.formats.keys import module_key, tensor_key
from peftlab.formats.native import read_json_object
from peftlab.formats.weights import read_weights
from peftlab.modules import Dims, Settings
from peftlab.modules.linear import IA3Settings, LoraSettings
from peftlab.modules.lowrank import AdaLoraSettings
from peftlab.modules.orthogonal import BoftSettings, HraSettings, OftSettings
from peftlab.modules.prefix import PrefixSettings, PromptSettings
from peftlab.modules.reparam import FourierFTSettings, LohaSettings, LokrSettings, VeraSettings
from peftlab.modules.selective import LNSettings
from peftlab.modules.whole import HeadCopy, head_copy

if TYPE_CHECKING:
    from peftlab.core.peft_model import PeftModel

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
EXPORTABLE = (
    "LoRA (DoRA on every site or none, without gates), AdaLoRA, (IA)3, VeRA, FourierFT, LoHa, LoKr, OFT, BOFT or "
    "HRA (one setting for all sites), LN tuning, prefix tuning in every layer or prompt tuning, each with its trained "
    "task head"
)
#: peft_type -> the peftlab kind it becomes
IMPORTABLE = {
    "LORA": "lora",
    "ADALORA": "adalora",
    "LN_TUNING": "ln",
    "IA3": "ia3",
    "VERA": "vera",
    "FOURIERFT": "fourierft",
    "LOHA": "loha",
    "LOKR": "lokr",
    "OFT": "oft",
    "BOFT": "boft",
    "HRA": "hra",
    "PREFIX_TUNING": "prefix",
    "PROMPT_TUNING": "prompt",
}
_PEFT_TYPES = {kind: peft_type for peft_type, kind in IMPORTABLE.items()}
#: peftlab kind -> the peft_type of the peft library's equivalent method (for side-by-side benchmarks; not AdaLoRA,
#: whose rank allocation peft runs only when the training loop calls its ``update_and_allocate``)
_EQUIVALENT = {k: v for k, v in _PEFT_TYPES.items() if k != "adalora"}
_LORA_WEIGHT = "{}.lora_A.weight", "{}.lora_B.weight"
_TASKS = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
)
#: the targeting fields every tuner of linear layers has
_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
#: config fields peftlab reads, per peft_type
_FIELDS = {
    "LORA": (
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "use_dora",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
    ),
    # peft's AdaLoRA ignores r (init_r is the rank); the schedule fields come along so that training can go on
    "ADALORA": (
        *_TARGETING,
        "r",
        "lora_alpha",
        "lora_dropout",
        "init_r",
        "target_r",
        "tinit",
        "tfinal",
        "deltaT",
        "beta1",
        "beta2",
        "orth_reg_weight",
        "total_step",
        "rank_pattern",
    ),
    "IA3": ("target_modules", "exclude_modules", "feedforward_modules"),
    "LN_TUNING": ("target_modules", "exclude_modules"),
    "VERA": (*_TARGETING, "r", "projection_prng_key", "save_projection", "d_initial"),
    "FOURIERFT": (*_TARGETING, "n_frequency", "n_frequency_pattern", "scaling", "random_loc_seed", "init_weights"),
    "LOHA": (*_TARGETING, "r", "alpha", "rank_pattern", "alpha_pattern"),
    "LOKR": (*_TARGETING, "r", "alpha", "rank_pattern", "alpha_pattern", "decompose_both", "decompose_factor"),
    "OFT": (
        "r",
        "oft_block_size",
        "module_dropout",
        "coft",
        "eps",
        "block_share",
        "use_cayley_neumann",
        "num_cayley_neumann_terms",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
    ),
    "BOFT": (
        "boft_block_size",
        "boft_block_num",
        "boft_n_butterfly_factor",
        "boft_dropout",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
    ),
    "HRA": ("r", "apply_GS", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"),
    "PREFIX_TUNING": (
        "num_virtual_tokens",
        "token_dim",
        "num_attention_heads",
        "num_layers",
        "num_transformer_submodules",
    ),
    "PROMPT_TUNING": ("num_virtual_tokens", "token_dim", "num_transformer_submodules"),
}
#: fields that describe the file, only matter for merging or only mattered when peft initialised the adapter
_IGNORED = {
    "peft_type",
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "modules_to_save",
    "fan_in_fan_out",
    "init_lora_weights",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "ensure_weight_tying",
    "init_ia3_weights",
    "init_weights",
    "encoder_hidden_size",
    "prefix_projection",
    "num_attention_heads",
    "num_layers",
    "prompt_tuning_init",
    "prompt_tuning_init_text",
    "tokenizer_name_or_path",
    "tokenizer_kwargs",
}

Tensors = dict[str, torch.Tensor]
Placed = dict[tuple[int | None, str], Settings]


# -- shared helpers ---------------------------------------------------------------------------------------
def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _task_type(model: nn.Module) -> str | None:
    """peft's task type for a transformers model class (it picks the PeftModel subclass on load)."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False) and name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM"
    for suffix, task in _TASKS:
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if name.endswith("Model") else None


def _key_root(prompt_learning: bool) -> str:
    """peft keys prompt-learning tensors from the PeftModel, the others from the tuner's wrapped model."""
    return "base_model." if prompt_learning else "base_model.model."


def _rope_shift(model: nn.Module, kv: torch.Tensor, steps: int) -> torch.Tensor:
    """Keys of ``kv`` (layers, 2, heads, length, head_dim) rotated by ``steps`` rotary positions.

    peft's queries sit ``length`` positions later than peftlab's, and the prefix keys are never rotated by
    the model; rotating peftlab's keys by +length (R_n·k) gives peft the same scores, -length undoes it.
    Models without a rotary embedding come back unchanged.
    """
    rotary = find_suffix(model, "rotary_emb")
    if rotary is None:
        return kv
    inv_freq = rotary.inv_freq.to(kv.device, torch.float64)
    head_dim = kv.shape[-1]
    if 2 * inv_freq.numel() != head_dim:
        raise PeftlabError(
            f"prefix tuning with partial rotary embeddings ({2 * inv_freq.numel()} of "
            f"{head_dim} dimensions) cannot be converted between peftlab and peft"
        )
    angles = steps * torch.cat([inv_freq, inv_freq])
    keys = kv[:, 0].to(torch.float64)
    half = head_dim // 2
    rotated = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
    keys = keys * angles.cos() + rotated * angles.sin()
    return torch.stack([keys.to(kv.dtype), kv[:, 1]], dim=1)


def _warn_positions(model: nn.Module, length: int) -> None:
    if find_suffix(model, "rotary_emb") is None:
        warnings.warn(
            f"peft runs prefixes as past key/values, so there the input's positions start at {length} (after "
            f"the prefix), in peftlab at 0; {type(model).__name__} has absolute position embeddings, so this "
            "prefix adapter gives different outputs in the two libraries",
            UserWarning,
            stacklevel=2,
        )


# -- export -------------------------------------------------------------------------------------------------
def peft_files(pm: PeftModel, adapter_name: str) -> dict[str, Callable[[Path], None]]:
    """The files of a peft adapter folder, each with its writer; all checks run before anything is written."""
    adapter = pm.adapters[adapter_name]
    placed = _placed(pm, adapter)
    kind = _exportable_kind(adapter_name, adapter.spec, placed)
    base = pm.base_model
    names = _module_names(base)
    config, tensors = _EXPORTERS[kind](pm, adapter, placed, names)
    prompt_learning = kind in ("prefix", "prompt")
    modules_to_save = None
    head = head_copy(adapter)
    if head is not None:
        head_name, _ = find_head(base, pm.anatomy)
        modules_to_save = [head_name]
        prefix = _key_root(prompt_learning) + head_name
        tensors |= {f"{prefix}.{k}": v for k, v in head.state_dict().items()}
    config = {
        "peft_type": _PEFT_TYPES[kind],
        "task_type": _task_type(base),
        "base_model_name_or_path": getattr(base.config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "modules_to_save": modules_to_save,
        **config,
    }
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return {
        WEIGHTS: lambda p: save_file(state, str(p), metadata={"format": "pt"}),
        CONFIG: lambda p: p.write_text(json.dumps(config, indent=2) + "\n"),
    }


def _placed(pm: PeftModel, adapter: nn.Module) -> Placed:
    """Which settings sit at which (layer, site) of the adapter as built (a spec may name sites that some
    blocks lack); model-level sites have layer None."""
    stacks = stack_names(pm.blocks)
    wanted = {
        (i, site): s for i, sites in adapter.spec.resolve(len(pm.blocks), stacks).items() for site, s in sites.items()
    }
    wanted |= {(None, site): s for site, s in adapter.spec.model.items()}
    return {key: s for key, s in wanted.items() if module_key(*key) in adapter.layers}


def _exportable_kind(name: str, spec: Spec, placed: Placed) -> str:
    """The one peft-representable kind the adapter uses, or one error naming everything that is not."""
    sites: dict[str, set[str]] = {}
    for (_, site), s in placed.items():
        sites.setdefault(s.kind, set()).add(site)
    problems = [
        what
        for flag, what in (
            (spec.full, "full fine-tuning"),
            (spec.gates, "UniPELT gates"),
            (spec.train_embeddings, "trained input embeddings"),
        )
        if flag
    ]
    problems += [f"'{k}' modules (at {', '.join(sorted(sites[k]))})" for k in sorted(set(sites) - set(_EXPORTERS))]
    kinds = sorted(set(sites) & set(_EXPORTERS))
    if len(kinds) > 1:
        problems.append(f"several kinds at once ({', '.join(kinds)}) where a peft adapter holds one")
    if not sites and not problems:
        problems.append("no modules besides the task head")
    if problems:
        raise PeftlabError(
            f"adapter '{name}' cannot be exported to the peft format: it has "
            f"{'; '.join(problems)}. The peft format holds {EXPORTABLE}; save it with "
            "format='peftlab' instead"
        )
    return kinds[0]


def _host_name(ref: LinearRef, names: dict[int, str], kind: str, where: str) -> str:
    name = names[id(ref.module)]
    if ref.out_slice is not None:
        raise PeftlabError(
            f"cannot export {kind} at {where} to the peft format: that site is a slice of the fused "
            f"projection '{name}', and peft places {kind} on whole modules; target unfused sites "
            "(o, ffn_in, ffn_out) instead"
        )
    return name


def _linear_modules(
    adapter: nn.Module, placed: Placed, names: dict[int, str], cls: type, kind: str
) -> list[tuple[str, Settings, nn.Module]]:
    """(host module name, settings, peftlab module) of every site of the given kind, in layer order."""
    found = []
    for (i, site), s in sorted((key, s) for key, s in placed.items() if isinstance(s, cls)):
        module = adapter.layers[module_key(i, site)]
        found.append((_host_name(module.ref, names, kind, f"layer {i} site '{site}'"), s, module))
    return found


def _fan_in_fan_out(modules: list[tuple[str, Settings, nn.Module]]) -> bool:
    """GPT-2's Conv1D stores its weight transposed; peft wants to be told (it matters when merging)."""
    return any(m.ref.transposed for _, _, m in modules)


def _as_plain_lora(s: LoraSettings, module: nn.Module) -> LoraSettings:
    """A site's settings as the plain LoRA it exports to: PiSSA / OLoRA (their start subtracted, peft's
    ``path_initial_model_for_weight_conversion``) at twice the rank and the alpha that keeps the scaling; the other
    inits are plain LoRA once started."""
    if not module.residual:
        return dataclasses.replace(s, init="default")
    alpha = s.alpha * (math.sqrt(2) if s.rslora else 2)
    return dataclasses.replace(s, r=2 * s.r, alpha=alpha, init="default")


def _export_lora(
    pm: PeftModel, adapter: nn.Module, placed: Placed, names: dict[int, str], convert: bool = True
) -> tuple[dict[str, Any], Tensors]:
    """peft's LoRA layout. ``convert``: a PiSSA / OLoRA adapter is written as the plain LoRA that peft's save
    converts it to, so it applies to the unchanged base model (the one peftlab keeps); False: its config as peft
    would start it (``peft_equivalent``)."""
    modules = _linear_modules(adapter, placed, names, LoraSettings, "LoRA")
    dropout = _uniform(modules, "dropout", "lora_dropout")
    dora = _uniform(modules, "dora", "use_dora")
    if convert:
        modules = [(name, _as_plain_lora(s, m), m) for name, s, m in modules]
    # The most common (r, alpha, rslora) is the default; other sites go to rank_pattern / alpha_pattern.
    # A site whose rslora differs from the default gets the alpha that gives its scaling under the default.
    r0, alpha0, rslora0 = Counter((s.r, s.alpha, s.rslora) for _, s, _ in modules).most_common(1)[0][0]
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    tensors: Tensors = {}
    for name, s, module in modules:
        alpha = s.alpha if s.rslora == rslora0 else s.scaling * (math.sqrt(s.r) if rslora0 else s.r)
        if s.r != r0:
            rank_pattern[re.escape(name)] = s.r
        if alpha != alpha0:
            alpha_pattern[re.escape(name)] = alpha
        a_key, b_key = (_key_root(False) + k.format(name) for k in _LORA_WEIGHT)
        tensors[a_key], tensors[b_key] = module.lora_A, module.lora_B
        if convert and module.residual:  # s·(B·A - B0·A0) = s·[B, -B0]·[A; A0], as peft's conversion writes it
            tensors[a_key] = torch.cat([module.lora_A, module.lora_A0], dim=0)
            tensors[b_key] = torch.cat([module.lora_B, -module.lora_B0], dim=1)
        if dora:  # m·(W + s·B·A) / ||W + s·B·A|| per output row, peft's DoraLinearLayer
            tensors[f"{_key_root(False)}{name}.lora_magnitude_vector"] = module.magnitude
    config = {
        "r": r0,
        "lora_alpha": alpha0,
        "use_rslora": rslora0,
        "use_dora": dora,
        "lora_dropout": dropout,
        "target_modules": [name for name, _, _ in modules],
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": _fan_in_fan_out(modules),
    }
    return config, tensors


def _export_ia3(
    pm: PeftModel, adapter: nn.Module, placed: Placed, names: dict[int, str]
) -> tuple[dict[str, Any], Tensors]:
    modules = _linear_modules(adapter, placed, names, IA3Settings, "(IA)3")
    tensors: Tensors = {}
    for name, _, module in modules:
        # peft's shapes: (1, in) scales a feedforward module's input, (out, 1) a module's output.
        vector = module.ia3_l
        tensors[f"{_key_root(False)}{name}.ia3_l"] = vector[None, :] if module.on_input else vector[:, None]
    config = {
        "target_modules": [name for name, _, _ in modules],
        "feedforward_modules": [name for name, _, m in modules if m.on_input],
        "fan_in_fan_out": _fan_in_fan_out(modules),
    }
    return config, tensors


Found = list[tuple[str, Settings, nn.Module]]


def _uniform(modules: Found, field: str, what: str) -> Any:
    """The one value of ``field`` that peft's config holds for every module, or an error naming the values used."""
    values = sorted({getattr(s, field) for _, s, _ in modules}, key=repr)
    if len(values) > 1:
        raise PeftlabError(
            f"cannot export to the peft format: peft has one {what} for all modules, "
            f"this adapter uses {', '.join(map(str, values))} at different sites"
        )
    return values[0]


def _common(modules: Found, value: Callable[[Settings], Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value (the config's default) and, keyed by escaped module name, the sites that differ
    (peft's rank_pattern / alpha_pattern, matched as ``(.*\\.)?(pattern)$``)."""
    default = Counter(value(s) for _, s, _ in modules).most_common(1)[0][0]
    return default, {re.escape(name): value(s) for name, s, _ in modules if value(s) != default}


def _no_conv1d(modules: Found, kind: str) -> None:
    """peft's LyCORIS tuners (LoHa, LoKr) take nn.Linear and convolutions, not GPT-2's Conv1D."""
    for name, _, module in modules:
        if module.ref.transposed:
            raise PeftlabError(
                f"cannot export {kind} on '{name}' to the peft format: peft's {kind} does not take "
                "transformers' Conv1D layers (GPT-2)"
            )


def _module_tensors(modules: Found, names: tuple[str, ...]) -> Tensors:
    """The named tensors of every module, under peft's keys (``<module>.<name>``, the adapter name dropped)."""
    return {
        f"{_key_root(False)}{host}.{n}": getattr(module, n)
        for host, _, module in modules
        for n in names
        if hasattr(module, n)
    }


def _export_vera(
    pm: PeftModel, adapter: nn.Module, placed: Placed, names: dict[int, str]
) -> tuple[dict[str, Any], Tensors]:
    modules = _linear_modules(adapter, placed, names, VeraSettings, "VeRA")
    s = modules[0][1]  # r, seed and save_projection agree (VeraSettings.plan)
    tensors = _module_tensors(modules, ("vera_lambda_b", "vera_lambda_d"))
    if s.save_projection:  # both libraries size the pair to the largest targeted module, so the shapes agree
        proj = adapter.shared["vera_projections"]
        tensors["base_model.vera_A"], tensors["base_model.vera_B"] = proj.vera_A, proj.vera_B
    config = {
        "r": s.r,
        "target_modules": [name for name, _, _ in modules],
        "projection_prng_key": s.seed,
        "save_projection": s.save_projection,
        "vera_dropout": 0.0,
        "d_initial": _common(modules, lambda s: s.d_initial)[0],  # only the initialisation reads it
        "bias": "none",
        "fan_in_fan_out": _fan_in_fan_out(modules),
    }
    return config, tensors


def _fourierft_pattern(name: str, n: int, modules: Found) -> tuple[str, int]:
    """peft matches n_frequency_pattern keys as ``.*\\.(key)$``: the module name after its first dot, checked to
    pick no other targeted module."""
    key = re.escape(name.partition(".")[2])
    if not key or any(other != name and re.match(rf".*\.{key}$", other) for other, _, _ in modules):
        raise PeftlabError(
            f"cannot export to the peft format: no n_frequency_pattern key picks out '{name}' alone; "
            "give its sites one n_frequency"
        )
    return key, n


def _export_fourierft(
    pm: PeftModel, adapter: nn.Module, placed: Placed, names: dict[int, str]
) -> tuple[dict[str, Any], Tensors]:
    modules = _linear_modules(adapter, placed, names, FourierFTSettings, "FourierFT")
    n0 = Counter(s.n_frequency for _, s, _ in modules).most_common(1)[0][0]
    pattern = dict(_fourierft_pattern(name, s.n_frequency, modules) for name, s, _ in modules if s.n_frequency != n0)
    config = {
        "n_frequency": n0,
        "n_frequency_pattern": pattern,
        "scaling": _uniform(modules, "scaling", "scaling"),
        "random_loc_seed": _uniform(modules, "seed", "random_loc_seed"),
        "init_weights": _common(modules, lambda s: s.init)[0] == "zeros",  # only the initialisation reads it
        "target_modules": [name for name, _, _ in modules],
        "bias": "none",
        "fan_in_fan_out": _fan_in_fan_out(modules),
    }
    return config, _module_tensors(modules, ("fourierft_spectrum",))


def _export_lycoris(modules: Found, kind: str) -> dict[str, Any]:
    """The rank and alpha fields LoHa and LoKr share (r and alpha by default, the other sites by pattern)."""
    _no_conv1d(modules, kind)
    r0, rank_pattern = _common(modules, lambda s: s.r)
    alpha0, alpha_pattern = _common(modules, lambda s: s.alpha)
    return {
        "r": r0,
        "alpha": alpha0,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "target_modules": [name for name, _, _ in modules],
    }


def _export_loha(
    pm: PeftModel, adapter: nn.Module, placed: Placed, names: dict[int, str]
) -> tuple[dict[str, Any], Tensors]:
    modules = _linear_modules(adapter, placed, names, LohaSettings, "LoHa")
    tensors = _module_tensors(modules, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    return _export_lycoris(modules, "LoHa"), tensors


_LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def _export_lokr(
    pm: PeftModel, adapter: nn.Module, placed: Placed, names: dict[int, str]
) -> tuple[dict[str, Any], Tensors]:
    modules = _linear_modules(adapter, placed, names, LokrSettings, "LoKr")
    config = _export_lycoris(modules, "LoKr")
    config["decompose_both"] = _uniform(modules, "decompose_both", "decompose_both")
    config["decompose_factor"] = _uniform(modules, "decompose_factor", "decompose_factor")
    return config, _module_tensors(modules, _LOKR_TENSORS)


def _one_setting(modules: list[tuple[str, Settings, nn.Module]], kind: str) -> Settings:
    """The settings every site shares (peft's OFT, BOFT and HRA configs have no per-module patterns), on torch
    Linear layers (peft 0.21 builds none of the three on GPT-2's Conv1D)."""
    conv = [name for name, _, m in modules if m.ref.transposed]
    if conv:
        raise PeftlabError(
            f"cannot export {kind} at '{conv[0]}' to the peft format: peft's {kind} takes torch Linear layers only, "
            "not GPT-2's Conv1D"
        )
    found = {repr(s) for _, s, _ in modules}
    if len(found) > 1:
        raise PeftlabError(
            f"cannot export to the peft format: peft's {kind} config holds one setting for all modules, this "
            f"adapter uses {len(found)} ({'; '.join(sorted(found))})"
        )
    return modules[0][1]


#: the OFT Cayley–Neumann series peftlab computes is peft's from this version on (peft warns on older files)
_NEUMANN_SINCE = "0.18.0"


def _export_oft(
    pm: PeftModel, adapter: nn.Module, placed: Placed, names: dict[int, str]
) -> tuple[dict[str, Any], Tensors]:
    modules = _linear_modules(adapter, placed, names, OftSettings, "OFT")
    s = _one_setting(modules, "OFT")
    assert isinstance(s, OftSettings)
    config = {
        "r": s.r,
        "oft_block_size": s.block_size,
        "module_dropout": s.module_dropout,
        "coft": s.coft,
        "eps": s.eps,
        "block_share": s.block_share,
        "use_cayley_neumann": s.cayley_neumann,
        "num_cayley_neumann_terms": s.neumann_terms,
        "target_modules": [name for name, _, _ in modules],
        "bias": "none",
        "peft_version": _NEUMANN_SINCE,
    }
    return config, {f"{_key_root(False)}{name}.oft_R.weight": m.oft_R for name, _, m in modules}


def _export_boft(
    pm: PeftModel, adapter: nn.Module, placed: Placed, names: dict[int, str]
) -> tuple[dict[str, Any], Tensors]:
    modules = _linear_modules(adapter, placed, names, BoftSettings, "BOFT")
    s = _one_setting(modules, "BOFT")
    assert isinstance(s, BoftSettings)
    config = {
        "boft_block_size": s.block_size,
        "boft_block_num": s.block_num,
        "boft_n_butterfly_factor": s.butterfly_factor,
        "boft_dropout": s.dropout,
        "target_modules": [name for name, _, _ in modules],
        "bias": "none",
    }
    tensors: Tensors = {}
    for name, _, m in modules:
        tensors[f"{_key_root(False)}{name}.boft_R"] = m.boft_R
        tensors[f"{_key_root(False)}{name}.boft_s"] = m.boft_s
    return config, tensors


def _export_hra(
    pm: PeftModel, adapter: nn.Module, placed: Placed, names: dict[int, str]
) -> tuple[dict[str, Any], Tensors]:
    modules = _linear_modules(adapter, placed, names, HraSettings, "HRA")
    s = _one_setting(modules, "HRA")
    assert isinstance(s, HraSettings)
    config = {"r": s.r, "apply_GS": s.apply_gs, "target_modules": [name for name, _, _ in modules], "bias": "none"}
    return config, {f"{_key_root(False)}{name}.hra_u": m.hra_u for name, _, m in modules}


def _export_prefix(
    pm: PeftModel, adapter: nn.Module, placed: Placed, names: dict[int, str]
) -> tuple[dict[str, Any], Tensors]:
    base = pm.base_model
    if getattr(base.config, "is_encoder_decoder", False):
        raise PeftlabError(
            "cannot export prefix tuning of an encoder-decoder model to the peft format: "
            "peft's prefixes reach the decoder's self-attention only (it empties the cross-attention cache), "
            "peftlab's the encoder's and decoder's self-attention and the cross-attention"
        )
    n_layers = len(pm.blocks)
    missing = [i for i in range(n_layers) if module_key(i, "attn") not in adapter.layers]
    lengths = sorted({s.length for s in placed.values() if isinstance(s, PrefixSettings)})
    if missing or len(lengths) > 1:
        raise PeftlabError(
            "cannot export prefix tuning to the peft format: peft needs a prefix of one length in every "
            f"layer; this adapter has lengths {', '.join(map(str, lengths))}"
            + (f" and none in layers {', '.join(map(str, missing))}" if missing else "")
        )
    length, dims = lengths[0], pm.dims
    kv = torch.stack([adapter.layers[module_key(i, "attn")].prefix_kv().detach() for i in range(n_layers)])
    _warn_positions(base, length)
    kv = _rope_shift(base, kv, length)
    # peft views the table as (tokens, layers * 2, heads, head_dim): layer l's keys, then its values.
    table = kv.permute(3, 0, 1, 2, 4).reshape(length, -1)
    config = {
        "num_virtual_tokens": length,
        "token_dim": dims.kv_dim,
        "num_attention_heads": dims.kv_heads,
        "num_layers": n_layers,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": dims.kv_dim,
        "prefix_projection": False,
    }
    return config, {"prompt_embeddings": table}


def _export_prompt(
    pm: PeftModel, adapter: nn.Module, placed: Placed, names: dict[int, str]
) -> tuple[dict[str, Any], Tensors]:
    prompt = adapter.layers[module_key(None, "input")].prompt
    dims = pm.dims
    # One submodule: peft prepends the table to the encoder input (of an encoder-decoder model too).
    config = {
        "num_virtual_tokens": prompt.shape[0],
        "token_dim": dims.hidden,
        "num_attention_heads": dims.heads,
        "num_layers": dims.num_layers,
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",
    }
    return config, {"prompt_embeddings": prompt}


def _export_adalora(
    pm: PeftModel, adapter: nn.Module, placed: Placed, names: dict[int, str]
) -> tuple[dict[str, Any], Tensors]:
    """peft's ADALORA layout: P, Λ, Q cut to the kept singular values, which ``rank_pattern`` lists per module (as peft
    saves a pruned adapter); no pattern before any pruning. The schedule fields only matter for training in peft, which
    wants a total_step: the settings', else the shortest that peft accepts."""
    modules = _linear_modules(adapter, placed, names, AdaLoraSettings, "AdaLoRA")
    s = modules[0][1]  # the budget settings agree (AdaLoraSettings.plan)
    _uniform(modules, "dropout", "lora_dropout")
    _uniform(modules, "alpha", "lora_alpha")
    kept = {name: (m.lora_E.detach().view(-1) != 0) for name, _, m in modules}
    every = torch.cat(list(kept.values()))
    pruned = bool(every.any()) and not bool(every.all())
    tensors: Tensors = {}
    rank_pattern: dict[str, list[bool]] = {}
    for name, _, m in modules:
        keep = kept[name] if pruned else torch.ones_like(kept[name])
        root = f"{_key_root(False)}{name}"
        tensors[f"{root}.lora_A"] = m.lora_A[keep]
        tensors[f"{root}.lora_E"] = m.lora_E[keep]
        tensors[f"{root}.lora_B"] = m.lora_B[:, keep]
        if pruned:
            rank_pattern[f"{name}.lora_E"] = keep.tolist()
    config = {
        "init_r": s.init_r,
        "target_r": s.target_r,
        "lora_alpha": s.alpha,
        "lora_dropout": s.dropout,
        "tinit": s.tinit,
        "tfinal": s.tfinal,
        "deltaT": s.deltaT,
        "beta1": s.beta1,
        "beta2": s.beta2,
        "orth_reg_weight": s.orth_reg_weight,
        "total_step": s.total_step or s.tinit + s.tfinal + 1,
        "target_modules": [name for name, _, _ in modules],
        "rank_pattern": rank_pattern or None,
        "bias": "none",
        "fan_in_fan_out": _fan_in_fan_out(modules),
    }
    return config, tensors


def _norm_hosts(base: nn.Module, blocks: list[Block]) -> dict[str, tuple[int | None, str, str, nn.Module]]:
    """Every norm peftlab's LN tuning can train: module name -> (layer or None, site, key in its module, norm)."""
    names = _module_names(base)
    anatomy = anatomy_for(base.config.model_type)
    found = {names[id(m)]: (b.index, "norm", _delta_key(p), m) for b in blocks for p, m in b.norms()}
    for site, paths in (("embed_norm", [anatomy.embed_norm]), ("final_norm", list(anatomy.final_norms))):
        for path in paths:
            if path and (m := find_suffix(base, path)) is not None:
                found[names[id(m)]] = (None, site, _delta_key(path), m)
    return found


def _delta_key(path: str) -> str:
    """The name of a norm's delta in peftlab's LN module (its path, dots as dashes)."""
    return path.replace(".", "-")


def _export_ln(
    pm: PeftModel, adapter: nn.Module, placed: Placed, names: dict[int, str]
) -> tuple[dict[str, Any], Tensors]:
    """peft's LN_TUNING holds a trained copy of every targeted norm: the base's weight (and bias) plus the delta."""
    tensors: Tensors = {}
    modules = dict(adapter.layers.items())
    for name, (layer, site, key, norm) in _norm_hosts(pm.base_model, pm.blocks).items():
        module = modules.get(module_key(layer, site))
        for part in ("weight", "bias") if module is not None else ():
            delta = module.deltas.get(f"{key}-{part}")
            if delta is not None:  # a merged delta is in the base's tensor already
                trained = getattr(norm, part) if module.merged else getattr(norm, part) + delta
                tensors[f"{_key_root(False)}{name}.ln_tuning_layers.{part}"] = trained
    targets = sorted({k.removeprefix(_key_root(False)).rsplit(".", 2)[0] for k in tensors})
    return {"target_modules": targets}, tensors


_EXPORTERS = {
    "lora": _export_lora,
    "ln": _export_ln,
    "adalora": _export_adalora,
    "ia3": _export_ia3,
    "vera": _export_vera,
    "fourierft": _export_fourierft,
    "loha": _export_loha,
    "lokr": _export_lokr,
    "oft": _export_oft,
    "boft": _export_boft,
    "hra": _export_hra,
    "prefix": _export_prefix,
    "prompt": _export_prompt,
}
#: the kinds at linear sites, whose peft config is exactly what their export writes
_LINEAR_EXPORTS = ("lora", "ia3", "vera", "fourierft", "loha", "lokr", "oft", "boft", "hra")


# -- import -------------------------------------------------------------------------------------------------
def read_peft(
    base: nn.Module, directory: Path, allow_non_finite: bool = False
) -> tuple[Spec, dict[str, torch.Tensor], str]:
    """The peftlab spec and tensors (by the adapter key scheme) of a peft adapter folder for ``base``."""
    config = _read_config(directory)
    peft_type = config.get("peft_type")
    if peft_type not in IMPORTABLE:
        raise AdapterLoadError(
            f"'{directory}': peft_type {peft_type!r} cannot be imported; peftlab imports {', '.join(IMPORTABLE)}"
        )
    _check_fields(config, peft_type, directory)
    state = read_weights(directory / WEIGHTS, allow_non_finite=allow_non_finite)
    blocks = find_blocks(base, anatomy_for(base.config.model_type))
    spec, tensors = _IMPORTERS[peft_type](base, blocks, config, state, directory)
    spec.method = IMPORTABLE[peft_type]
    head = _take_head(base, state, _key_root(IMPORTABLE[peft_type] in ("prefix", "prompt")))
    spec.train_head = bool(head)
    tensors |= {f"{HeadCopy.state_prefix}.{k}": v for k, v in head.items()}
    if state:
        raise AdapterLoadError(
            f"'{directory}' holds tensors peftlab cannot place: {', '.join(sorted(state)[:3])}"
            f"{' ...' if len(state) > 3 else ''} (peftlab imports modules at the linear sites of transformer "
            "blocks, prefixes, prompts and the task head)"
        )
    return spec, tensors, "default"


def _read_config(directory: Path) -> dict[str, Any]:
    return read_json_object(directory / CONFIG, "peft adapter config")


def _check_fields(config: dict[str, Any], peft_type: str, directory: Path) -> None:
    """Refuse options peftlab would silently drop: any field it does not know, set to a non-default value."""
    known = _IGNORED | set(_FIELDS[peft_type])
    used = {k: v for k, v in config.items() if k not in known and v not in (None, False, "none", "", [], {})}
    if used:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(used.items()))
        raise AdapterLoadError(
            f"'{directory}': peftlab cannot import this {peft_type} adapter: it uses "
            f"{listed}; peftlab reads {', '.join(_FIELDS[peft_type])}"
        )


def _take_head(base: nn.Module, state: Tensors, prefix: str) -> Tensors:
    """Pop the task head's tensors (peft's modules_to_save entry for it) from ``state``."""
    found = find_head(base, anatomy_for(base.config.model_type))
    if found is None:
        return {}
    start = f"{prefix}{found[0]}."
    return {k.removeprefix(start): state.pop(k) for k in [k for k in state if k.startswith(start)]}


def _linear_sites(base: nn.Module, blocks: list[Block]) -> tuple[dict[str, tuple[int, str]], set[str]]:
    """Module name -> (layer, site) of every linear site, and the names of fused hosts (no single site)."""
    names = _module_names(base)
    sites: dict[str, tuple[int, str]] = {}
    fused: set[str] = set()
    for b in blocks:
        for site, path in b.stack.linear.items():
            sites[names[id(b.sub(path))]] = (b.index, site)
        fused |= {names[id(b.sub(path))] for path, _, _ in b.stack.fused.values()}
    return sites, fused


def _matches_list(names: list[str], key: str) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)


def _is_target(config: dict[str, Any], key: str) -> bool:
    """peft's rule (tuners_utils.check_target_module_exists) for whether module ``key`` is targeted."""
    exclude = config.get("exclude_modules")
    if exclude and (re.fullmatch(exclude, key) if isinstance(exclude, str) else _matches_list(exclude, key)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.get("modules_to_save") or []):
        return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            if match := re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key):
                break
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup (utils.other.get_pattern_key)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _targets(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], method: str, directory: Path
) -> list[tuple[str, int, str]]:
    """(module name, layer, site) of every module the config targets; all must be peftlab linear sites."""
    targets = config.get("target_modules")
    if not targets or targets == "all-linear":
        raise AdapterLoadError(
            f"'{directory}': target_modules is {targets!r}; peftlab needs module names "
            "or a regular expression (peft writes them when it saves)"
        )
    sites, fused = _linear_sites(base, blocks)
    found = []
    for name, _ in base.named_modules():
        if not name or not _is_target(config, name):
            continue
        if name in fused:
            raise AdapterLoadError(
                f"'{directory}': {method} on '{name}' changes a fused q/k/v projection "
                "as one matrix; peftlab places modules on its q, k and v slices "
                "separately"
            )
        if name not in sites:
            raise AdapterLoadError(
                f"'{directory}': {method} on '{name}' cannot be imported: peftlab places "
                "modules only at the linear sites of transformer blocks"
            )
        found.append((name, *sites[name]))
    if not found:
        raise AdapterLoadError(f"'{directory}': target_modules {targets!r} match no module of this model")
    return found


def _layer_spec(placed: dict[tuple[int, str], Settings]) -> Spec:
    """A spec with one explicit selector per layer."""
    layers: dict[str, dict[str, Settings | None]] = {}
    for (i, site), s in sorted(placed.items()):
        layers.setdefault(str(i), {})[site] = s
    return Spec(layers=layers)


def _pop(state: Tensors, key: str, directory: Path) -> torch.Tensor:
    if key not in state:
        raise AdapterLoadError(f"'{directory}' lacks tensor '{key}' that its config calls for")
    return state.pop(key)


def _import_lora(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], state: Tensors, directory: Path
) -> tuple[Spec, Tensors]:
    placed: dict[tuple[int, str], Settings] = {}
    tensors: Tensors = {}
    for name, i, site in _targets(base, blocks, config, "LoRA", directory):
        r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        settings = LoraSettings(
            r=r,
            alpha=float(alpha),
            rslora=bool(config.get("use_rslora")),
            dropout=float(config.get("lora_dropout") or 0.0),
            dora=bool(config.get("use_dora")),
        )
        settings.check_at(f"'{directory}' module '{name}'")
        placed[(i, site)] = settings
        a_key, b_key = (_key_root(False) + k.format(name) for k in _LORA_WEIGHT)
        tensors[tensor_key(i, site, "lora_A")] = _pop(state, a_key, directory)
        tensors[tensor_key(i, site, "lora_B")] = _pop(state, b_key, directory)
        if settings.dora:
            magnitude = _pop(state, f"{_key_root(False)}{name}.lora_magnitude_vector", directory)
            tensors[tensor_key(i, site, "magnitude")] = magnitude
    return _layer_spec(placed), tensors


def _kept_ranks(config: dict[str, Any], init_r: int, directory: Path) -> dict[str, torch.Tensor]:
    """Module name -> which of its init_r singular values the file holds (peft's ``rank_pattern``, keyed by the
    module's ``lora_E`` parameter, with or without the adapter name after it); modules it does not list hold all."""
    kept: dict[str, torch.Tensor] = {}
    for key, keep in (config.get("rank_pattern") or {}).items():
        parts = key.split(".")
        parts = parts if parts[-1] == "lora_E" else parts[:-1]
        if parts[-1:] != ["lora_E"] or not isinstance(keep, list) or len(keep) != init_r:
            raise AdapterLoadError(
                f"'{directory}': rank_pattern entry {key!r} is not a {init_r}-long list of kept ranks of a lora_E"
            )
        kept[".".join(parts[:-1])] = torch.tensor([bool(k) for k in keep])
    return kept


def _import_adalora(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], state: Tensors, directory: Path
) -> tuple[Spec, Tensors]:
    """peft's pruned singular values come back as exact zeros of Λ (the peftlab form), their P columns and Q rows
    as zeros; the scaling stays alpha / init_r, as peft keeps it when it resizes a pruned module."""
    init_r = config.get("init_r", 12)
    settings = AdaLoraSettings(
        init_r=init_r,
        target_r=config.get("target_r", 8),
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout") or 0.0),
        tinit=config.get("tinit", 0),
        tfinal=config.get("tfinal", 0),
        deltaT=config.get("deltaT", 1),
        beta1=float(config.get("beta1", 0.85)),
        beta2=float(config.get("beta2", 0.85)),
        orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
        total_step=config.get("total_step") or 0,
    )
    settings.check_at(f"'{directory}'")
    kept = _kept_ranks(config, init_r, directory)
    placed: dict[tuple[int, str], Settings] = {}
    tensors: Tensors = {}
    for name, i, site in _targets(base, blocks, config, "AdaLoRA", directory):
        placed[(i, site)] = settings
        keep = kept.get(name, torch.ones(init_r, dtype=torch.bool))
        root = f"{_key_root(False)}{name}"
        a, e, b = (_pop(state, f"{root}.{k}", directory) for k in ("lora_A", "lora_E", "lora_B"))
        rows = int(keep.sum())
        if a.shape[0] != rows or e.shape != (rows, 1) or b.shape[1] != rows:
            raise AdapterLoadError(
                f"'{directory}': AdaLoRA tensors of '{name}' hold {a.shape[0]} ranks, its rank pattern {rows}"
            )
        full_a, full_e = a.new_zeros(init_r, a.shape[1]), e.new_zeros(init_r, 1)
        full_b = b.new_zeros(b.shape[0], init_r)
        full_a[keep], full_e[keep], full_b[:, keep] = a, e, b
        tensors |= {tensor_key(i, site, k): t for k, t in (("lora_A", full_a), ("lora_E", full_e), ("lora_B", full_b))}
    return _layer_spec(placed), tensors


def _import_ln(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], state: Tensors, directory: Path
) -> tuple[Spec, Tensors]:
    """Each trained norm copy becomes a delta on the base's norm; peftlab's LN tuning trains every norm of a block
    (and each model-level norm site) together, so a config that picks some of a block's norms is refused."""
    hosts = _norm_hosts(base, blocks)
    if not config.get("target_modules"):
        raise AdapterLoadError(f"'{directory}': target_modules is empty; peftlab needs the norms' names")
    targeted = [n for n, _ in base.named_modules() if n and _is_target(config, n)]
    other = [n for n in targeted if n not in hosts]
    if other:
        raise AdapterLoadError(
            f"'{directory}': LN tuning on '{other[0]}', which is not a norm peftlab's LN tuning trains (the blocks' "
            "norms, the embedding norm and the final norms)"
        )
    groups: dict[tuple[int | None, str], list[str]] = {}
    for name, (layer, site, _, _) in hosts.items():
        groups.setdefault((layer, site), []).append(name)
    tensors: Tensors = {}
    chosen = sorted({(hosts[n][0], hosts[n][1]) for n in targeted}, key=lambda g: (g[0] is None, g[0] or 0, g[1]))
    for group in chosen:
        missing = [n for n in groups[group] if n not in targeted]
        if missing:
            raise AdapterLoadError(
                f"'{directory}': LN tuning leaves out '{missing[0]}'; peftlab's LN tuning trains every norm of "
                f"{'layer ' + str(group[0]) if group[0] is not None else 'the ' + group[1]} together"
            )
        for name in groups[group]:
            layer, site, key, norm = hosts[name]
            for part in ("weight", "bias"):
                if getattr(norm, part, None) is not None:
                    saved = _pop(state, f"{_key_root(False)}{name}.ln_tuning_layers.{part}", directory)
                    tensors[tensor_key(layer, site, f"deltas.{key}-{part}")] = saved - getattr(norm, part).detach()
    layers: dict[str, dict[str, Settings | None]] = {}
    model: dict[str, Settings] = {}
    for layer, site in chosen:
        if layer is None:
            model[site] = LNSettings()
        else:
            layers.setdefault(str(layer), {})[site] = LNSettings()
    return Spec(layers=layers, model=model), tensors


def _import_ia3(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], state: Tensors, directory: Path
) -> tuple[Spec, Tensors]:
    feedforward = config.get("feedforward_modules") or []
    placed: dict[tuple[int, str], Settings] = {}
    tensors: Tensors = {}
    for name, i, site in _targets(base, blocks, config, "(IA)3", directory):
        # peft's rule (IA3Model._check_target_module_feedforward): a bare suffix, not a dotted one.
        on_input = (
            re.fullmatch(feedforward, name) is not None
            if isinstance(feedforward, str)
            else any(name.endswith(f) for f in feedforward)
        )
        if on_input != (site == "ffn_out"):
            where = "input" if on_input else "output"
            raise AdapterLoadError(
                f"'{directory}': (IA)3 scales the {where} of '{name}' (site '{site}'); peftlab's (IA)3 "
                "scales the input of ffn_out and the output of every other site, so feedforward_modules "
                "must be exactly the FFN output projections"
            )
        placed[(i, site)] = IA3Settings()
        tensors[tensor_key(i, site, "ia3_l")] = _pop(state, f"{_key_root(False)}{name}.ia3_l", directory).reshape(-1)
    return _layer_spec(placed), tensors


def _import_vera(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], state: Tensors, directory: Path
) -> tuple[Spec, Tensors]:
    settings = VeraSettings(
        r=config.get("r", 256),
        d_initial=float(config.get("d_initial", 0.1)),
        seed=config.get("projection_prng_key", 0),
        save_projection=config.get("save_projection", True),
    )
    settings.check_at(f"'{directory}'")
    placed: dict[tuple[int, str], Settings] = {}
    tensors: Tensors = {}
    for name, i, site in _targets(base, blocks, config, "VeRA", directory):
        placed[(i, site)] = settings
        for n in ("vera_lambda_b", "vera_lambda_d"):
            tensors[tensor_key(i, site, n)] = _pop(state, f"{_key_root(False)}{name}.{n}", directory)
    if settings.save_projection:  # else both libraries draw the pair again from projection_prng_key
        for n in ("vera_A", "vera_B"):
            tensors[f"shared.vera_projections.{n}"] = _pop(state, f"base_model.{n}", directory)
    return _layer_spec(placed), tensors


def _import_fourierft(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], state: Tensors, directory: Path
) -> tuple[Spec, Tensors]:
    patterns = config.get("n_frequency_pattern") or {}
    placed: dict[tuple[int, str], Settings] = {}
    tensors: Tensors = {}
    for name, i, site in _targets(base, blocks, config, "FourierFT", directory):
        # peft's rule (FourierFTModel._create_and_replace): the first key matching '.*\.key$'
        key = next((k for k in patterns if re.match(rf".*\.{k}$", name)), None)
        settings = FourierFTSettings(
            n_frequency=patterns[key] if key is not None else config.get("n_frequency", 1000),
            scaling=float(config.get("scaling", 150.0)),
            seed=config.get("random_loc_seed", 777),
            init="zeros" if config.get("init_weights") else "normal",
        )
        settings.check_at(f"'{directory}' module '{name}'")
        placed[(i, site)] = settings
        key = f"{_key_root(False)}{name}.fourierft_spectrum"
        tensors[tensor_key(i, site, "fourierft_spectrum")] = _pop(state, key, directory)
    return _layer_spec(placed), tensors


def _import_lycoris(
    base: nn.Module,
    blocks: list[Block],
    config: dict[str, Any],
    state: Tensors,
    directory: Path,
    kind: str,
    make: Callable[[int, float], Settings],
) -> tuple[Spec, Tensors]:
    """LoHa and LoKr: per module, r and alpha by peft's patterns; every tensor peft saved for the module."""
    placed: dict[tuple[int, str], Settings] = {}
    tensors: Tensors = {}
    for name, i, site in _targets(base, blocks, config, kind, directory):
        r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("alpha", 8))
        settings = make(r, float(alpha))
        settings.check_at(f"'{directory}' module '{name}'")
        placed[(i, site)] = settings
        prefix = f"{_key_root(False)}{name}."
        for key in [k for k in state if k.startswith(prefix) and "." not in k.removeprefix(prefix)]:
            tensors[tensor_key(i, site, key.removeprefix(prefix))] = state.pop(key)
    return _layer_spec(placed), tensors


def _import_loha(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], state: Tensors, directory: Path
) -> tuple[Spec, Tensors]:
    return _import_lycoris(base, blocks, config, state, directory, "LoHa", lambda r, a: LohaSettings(r=r, alpha=a))


def _import_lokr(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], state: Tensors, directory: Path
) -> tuple[Spec, Tensors]:
    both, factor = bool(config.get("decompose_both")), config.get("decompose_factor", -1)

    def make(r: int, alpha: float) -> Settings:
        return LokrSettings(r=r, alpha=alpha, decompose_both=both, decompose_factor=factor)

    return _import_lycoris(base, blocks, config, state, directory, "LoKr", make)


def _version(text: str) -> tuple[int, ...]:
    """A release's leading numbers ('0.18.0.dev0@abc' -> (0, 18, 0)); enough to order peft versions."""
    return tuple(int(p) for p in re.findall(r"\d+", text.partition("@")[0])[:3])


def _import_oft(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], state: Tensors, directory: Path
) -> tuple[Spec, Tensors]:
    neumann = bool(config.get("use_cayley_neumann", False))
    if neumann and _version(str(config.get("peft_version") or "0")) < _version(_NEUMANN_SINCE):
        raise AdapterLoadError(
            f"'{directory}': an OFT adapter from peft {config.get('peft_version') or '(unknown)'} with "
            f"use_cayley_neumann=True uses the series peft changed in {_NEUMANN_SINCE}; peftlab computes the new one"
        )
    settings = OftSettings(
        r=config.get("r") or 0,
        block_size=config.get("oft_block_size") or 0,
        module_dropout=float(config.get("module_dropout") or 0.0),
        coft=bool(config.get("coft")),
        eps=float(config.get("eps", 6e-5)),
        block_share=bool(config.get("block_share")),
        cayley_neumann=neumann,
        neumann_terms=config.get("num_cayley_neumann_terms", 5),
    )
    settings.check_at(f"'{directory}'")
    placed: dict[tuple[int, str], Settings] = {}
    tensors: Tensors = {}
    for name, i, site in _targets(base, blocks, config, "OFT", directory):
        placed[(i, site)] = settings
        tensors[tensor_key(i, site, "oft_R")] = _pop(state, f"{_key_root(False)}{name}.oft_R.weight", directory)
    return _layer_spec(placed), tensors


def _import_boft(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], state: Tensors, directory: Path
) -> tuple[Spec, Tensors]:
    placed: dict[tuple[int, str], Settings] = {}
    tensors: Tensors = {}
    for name, i, site in _targets(base, blocks, config, "BOFT", directory):
        rotation = _pop(state, f"{_key_root(False)}{name}.boft_R", directory)
        # Without its CUDA extension peft runs (and saves) one butterfly factor whatever the config says: the
        # tensor holds the factors peft actually used.
        settings = BoftSettings(
            block_size=config.get("boft_block_size") or 0,
            block_num=config.get("boft_block_num") or 0,
            butterfly_factor=rotation.shape[0] if rotation.dim() == 4 else config.get("boft_n_butterfly_factor", 1),
            dropout=float(config.get("boft_dropout") or 0.0),
        )
        settings.check_at(f"'{directory}' module '{name}'")
        placed[(i, site)] = settings
        tensors[tensor_key(i, site, "boft_R")] = rotation
        tensors[tensor_key(i, site, "boft_s")] = _pop(state, f"{_key_root(False)}{name}.boft_s", directory)
    return _layer_spec(placed), tensors


def _import_hra(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], state: Tensors, directory: Path
) -> tuple[Spec, Tensors]:
    settings = HraSettings(r=config.get("r", 8), apply_gs=bool(config.get("apply_GS")))
    settings.check_at(f"'{directory}'")
    placed: dict[tuple[int, str], Settings] = {}
    tensors: Tensors = {}
    for name, i, site in _targets(base, blocks, config, "HRA", directory):
        placed[(i, site)] = settings
        tensors[tensor_key(i, site, "hra_u")] = _pop(state, f"{_key_root(False)}{name}.hra_u", directory)
    return _layer_spec(placed), tensors


def _expect(config: dict[str, Any], field: str, expected: int, what: str, directory: Path) -> None:
    if config.get(field) != expected:
        raise AdapterLoadError(
            f"'{directory}' was made for a model with {field}={config.get(field)!r}; this model has {expected} {what}"
        )


def _import_prefix(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], state: Tensors, directory: Path
) -> tuple[Spec, Tensors]:
    submodules = config.get("num_transformer_submodules") or 1
    if getattr(base.config, "is_encoder_decoder", False) or submodules != 1:
        raise AdapterLoadError(
            f"'{directory}': peft's prefix tuning of encoder-decoder models keeps one table for the "
            "decoder's self- and cross-attention and applies it to the self-attention only; peftlab's prefixes "
            "are per location (encoder, decoder, cross-attention)"
        )
    dims = Dims.of(base.config, len(blocks))
    _expect(config, "num_layers", len(blocks), "layers", directory)
    _expect(config, "num_attention_heads", dims.kv_heads, "key/value heads", directory)
    _expect(config, "token_dim", dims.kv_dim, "key/value features per token", directory)
    length = config.get("num_virtual_tokens")
    table = _pop(state, "prompt_embeddings", directory)
    if not isinstance(length, int) or table.shape != (length, len(blocks) * 2 * dims.kv_dim):
        raise AdapterLoadError(
            f"'{directory}': prompt_embeddings has shape {tuple(table.shape)}, expected "
            f"({length}, {len(blocks) * 2 * dims.kv_dim})"
        )
    kv = table.reshape(length, len(blocks), 2, dims.kv_heads, dims.head_dim).permute(1, 2, 3, 0, 4)
    _warn_positions(base, length)
    kv = _rope_shift(base, kv, -length)
    settings = PrefixSettings(length=length, reparam=False)
    spec = _layer_spec({(i, "attn"): settings for i in range(len(blocks))})
    return spec, {tensor_key(i, "attn", "kv"): kv[i] for i in range(len(blocks))}


def _import_prompt(
    base: nn.Module, blocks: list[Block], config: dict[str, Any], state: Tensors, directory: Path
) -> tuple[Spec, Tensors]:
    dims = Dims.of(base.config, len(blocks))
    _expect(config, "token_dim", dims.hidden, "hidden features", directory)
    length = config.get("num_virtual_tokens")
    table = _pop(state, "prompt_embeddings", directory)
    if not isinstance(length, int) or table.dim() != 2 or table.shape[0] < length or table.shape[1] != dims.hidden:
        raise AdapterLoadError(
            f"'{directory}': prompt_embeddings has shape {tuple(table.shape)}, expected ({length}, {dims.hidden})"
        )
    # With two submodules (encoder-decoder) peft stores twice the rows but prompts the encoder with the first.
    spec = Spec(model={"input": PromptSettings(length=length, init="random")})
    return spec, {tensor_key(None, "input", "prompt"): table[:length]}


_IMPORTERS = {
    "LORA": _import_lora,
    "ADALORA": _import_adalora,
    "LN_TUNING": _import_ln,
    "IA3": _import_ia3,
    "VERA": _import_vera,
    "FOURIERFT": _import_fourierft,
    "LOHA": _import_loha,
    "LOKR": _import_lokr,
    "OFT": _import_oft,
    "BOFT": _import_boft,
    "HRA": _import_hra,
    "PREFIX_TUNING": _import_prefix,
    "PROMPT_TUNING": _import_prompt,
}


def peft_equivalent(pm: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The peft config (as ``get_peft_config`` takes it) of the active adapter's method, or None and why.

    Built from the adapter as placed on this model, so target module names come from the anatomy."""
    adapter = pm.adapters[pm.active_adapter]
    spec = adapter.spec
    kinds = spec.kinds()
    kind = next(iter(kinds)) if len(kinds) == 1 else None
    if spec.full or spec.gates or spec.train_embeddings or kind not in _EQUIVALENT:
        return None, "the peft library has no equivalent"
    base = pm.base_model
    placed = _placed(pm, adapter)
    names = _module_names(base)
    if kind in _LINEAR_EXPORTS:
        inits = {s.init for s in placed.values() if isinstance(s, LoraSettings)}
        if "eva" in inits:
            return None, "peft's EVA needs initialize_lora_eva_weights with a data loader"
        if len(inits) > 1:
            return None, "peft has one init_lora_weights for all modules"
        try:
            if kind == "lora":
                config, _ = _export_lora(pm, adapter, placed, names, convert=False)
            else:
                config, _ = _EXPORTERS[kind](pm, adapter, placed, names)
        except PeftlabError as e:
            return None, str(e)
        if any(isinstance(s, LoraSettings) and s.dora for s in placed.values()):
            config["use_dora"] = True
        if inits - {"default"}:
            config["init_lora_weights"] = next(iter(inits))
    elif kind == "prefix":
        settings = [s for s in placed.values() if isinstance(s, PrefixSettings)]
        if base.config.is_encoder_decoder or len(settings) != len(pm.blocks) or len(set(map(repr, settings))) > 1:
            return None, "peft puts one prefix in every layer of a decoder or encoder only (not T5's three locations)"
        s = settings[0]
        config = {"num_virtual_tokens": s.length, "prefix_projection": s.reparam, "encoder_hidden_size": s.hidden}
    elif kind == "prompt":
        config = {"num_virtual_tokens": spec.model["input"].length, "prompt_tuning_init": "RANDOM"}
    else:  # ln
        config, _ = _export_ln(pm, adapter, placed, names)
    return {"peft_type": _EQUIVALENT[kind], "task_type": _task_type(base), **config}, None
