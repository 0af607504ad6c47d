"""Methods from the literature, each a function that returns a :class:`~peftlab.core.spec.Spec`.

A method is data, not a code path: everything it does is visible in the spec it returns. Defaults follow
the papers; where the UniPELT paper (Mao et al. 2022) fixes them they are used: LoRA r=8 on query and
value, bottleneck 48, prefix length 10.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

from torch import nn

from peftlab.backbone.anatomy import LINEAR_SITES, PREFIX_SITES
from peftlab.core.spec import Spec
from peftlab.errors import SpecError
from peftlab.formats.components import fuse_layers
from peftlab.modules.base import Settings, need_int
from peftlab.modules.bottleneck import (
    HOULSBY,
    PFEIFFER,
    AdaMixSettings,
    AdapterSettings,
    CompacterSettings,
    KronaResSettings,
    Placement,
    SparseAdapterSettings,
)
from peftlab.modules.intrinsic import IntrinsicSaidSettings
from peftlab.modules.linear import IA3Settings, KronaSettings, LoraSettings
from peftlab.modules.lowrank import AdaLoraSettings, GloraSettings
from peftlab.modules.orthogonal import BoftSettings, HraSettings, OftSettings
from peftlab.modules.prefix import AdaptivePrefixSettings, PrefixSettings, PromptSettings
from peftlab.modules.reparam import FourierFTSettings, LohaSettings, LokrSettings, VeraSettings
from peftlab.modules.selective import BitFitSettings, LNSettings
from peftlab.modules.side import LstSettings
from peftlab.modules.sparse import (
    DiffFitSettings,
    DiffPruningSettings,
    FishMaskSettings,
    LtSftSettings,
    UnfreezeSettings,
)
from peftlab.space import S4_CHOICE, Backbone, design_spec


@dataclass(frozen=True)
class Method:
    name: str
    make: Callable[..., Spec]
    summary: str
    paper: str


METHODS: dict[str, Method] = {}

_TARGET_LETTERS = {"q": "q", "k": "k", "v": "v", "o": "o"}
#: every linear site; sites a block lacks (gate projections, cross-attention) are skipped there
_ALL_LINEAR = ("q", "k", "v", "o", "ffn_gate", "ffn_in", "ffn_out", "cross_q", "cross_k", "cross_v", "cross_o")


def method(name: str, summary: str, paper: str) -> Callable[[Callable[..., Spec]], Callable[..., Spec]]:
    """Register a preset under ``name`` (one registration point per method)."""

    def wrap(fn: Callable[..., Spec]) -> Callable[..., Spec]:
        def make(*args, **kwargs) -> Spec:
            spec = fn(*args, **kwargs)
            spec.method = name
            return spec

        make.__name__, make.__doc__ = fn.__name__, fn.__doc__
        make.__wrapped__ = fn  # inspect.signature(make) is fn's: the settings the preset takes
        METHODS[name] = Method(name, make, summary, paper)
        return make

    return wrap


def parse_targets(targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """Target linear sites: "qv" (letters), "all-linear", or a list of site names."""
    if targets == "all-linear":
        return list(_ALL_LINEAR)
    if isinstance(targets, str):
        if all(c in _TARGET_LETTERS for c in targets) and targets:
            return [_TARGET_LETTERS[c] for c in targets]
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in LINEAR_SITES]
    if bad or not targets:
        raise SpecError(
            f"unknown target(s) {', '.join(bad) or '(none)'}; use letters of 'qkvo', 'all-linear' or sites from: "
            f"{', '.join(LINEAR_SITES)}"
        )
    return list(targets)


def _every_layer(sites: dict) -> dict:
    return {"*": sites}


def _at_targets(settings: Settings, targets: str | list[str] | tuple[str, ...]) -> Spec:
    """One checked module kind at the target linear sites of every layer (the shape of most linear presets)."""
    settings.check_at()
    return Spec(layers=_every_layer(dict.fromkeys(parse_targets(targets), settings)))


@method("lora", "low-rank update W + (alpha/r)·B·A on chosen linears", "Hu et al. 2022")
def lora(
    r: int = 8, alpha: float = 16.0, targets: str | list[str] = "qv", rslora: bool = False, dropout: float = 0.0
) -> Spec:
    """LoRA on ``targets`` of every layer (r=8 on query and value by default, scaling alpha/r = 2)."""
    s = LoraSettings(r=r, alpha=alpha, rslora=rslora, dropout=dropout)
    return _at_targets(s, targets)


@method("dora", "LoRA with a separately trained magnitude per output", "Liu et al. 2024")
def dora(r: int = 8, alpha: float = 16.0, targets: str | list[str] = "qv", rslora: bool = False) -> Spec:
    s = LoraSettings(r=r, alpha=alpha, rslora=rslora, dora=True)
    return _at_targets(s, targets)


def _lora_init(init: str, r: int, alpha: float, targets: str | list[str], **kw: object) -> Spec:
    s = LoraSettings(r=r, alpha=alpha, init=init, **kw)
    return _at_targets(s, targets)


@method("pissa", "LoRA started from W's principal singular vectors and values", "Meng et al. 2024")
def pissa(
    r: int = 8, alpha: float = 8.0, targets: str | list[str] = "qv", niter: int | None = None, rslora: bool = False
) -> Spec:
    """PiSSA: A, B start as the top-r singular factors of W (``niter``: by a randomised SVD with that many subspace
    iterations, peft's ``pissa_niter_K``); the backbone stays as it is and the module keeps the model unchanged at
    init by a stored correction (see :class:`~peftlab.modules.linear.LoRA`). alpha = r as in the paper's runs."""
    if niter is not None:
        need_int("niter", niter, 1)
    return _lora_init("pissa" if niter is None else f"pissa_niter_{niter}", r, alpha, targets, rslora=rslora)


@method("olora", "LoRA started from the QR factors of W", "Büyükakyüz 2024")
def olora(r: int = 8, alpha: float = 16.0, targets: str | list[str] = "qv") -> Spec:
    """OLoRA: B, A start as the first r columns of Q and rows of R in W = QR (the model kept unchanged as PiSSA's)."""
    return _lora_init("olora", r, alpha, targets)


@method(
    "eva", "LoRA with A from the principal components of the layer inputs, ranks redistributed", "Paischer et al. 2024"
)
def eva(r: int = 8, alpha: float = 16.0, targets: str | list[str] = "qv", rho: float = 2.0) -> Spec:
    """EVA: A starts as the top right singular vectors of each site's inputs on the first training batches, and the
    rank budget (r per site) goes to the components explaining the most variance, at most r·rho per site. It needs
    data: ``peftlab train`` computes it before the first step (:mod:`peftlab.train.eva`); applied without data the
    modules start as plain LoRA."""
    return _lora_init("eva", r, alpha, targets, eva_rho=rho)


def _adapter(
    size: int, scaling: float = 1.0, activation: str = "relu", placement: Placement = HOULSBY
) -> AdapterSettings:
    s = AdapterSettings(size=size, scaling=scaling, activation=activation, **asdict(placement))
    s.check_at()
    return s


@method("houlsby", "serial adapters on the attention and FFN outputs, before residual", "Houlsby et al. 2019")
def houlsby(size: int = 48, activation: str = "relu") -> Spec:
    """Each adapter reads its sub-layer's output before the residual and LayerNorm (AdapterHub's ``double_seq_bn``)."""
    a = _adapter(size, activation=activation)
    return Spec(layers=_every_layer({"after_attn": a, "after_ffn": a}))


@method("pfeiffer", "one serial adapter on the FFN's normalised output", "Pfeiffer et al. 2021")
def pfeiffer(size: int = 48, activation: str = "relu") -> Spec:
    """The adapter reads the FFN output after residual and LayerNorm, its residual is the FFN output before them,
    and the LayerNorm is applied again after it (AdapterHub's ``seq_bn``)."""
    return Spec(layers=_every_layer({"after_ffn": _adapter(size, activation=activation, placement=PFEIFFER)}))


@method("adapterdrop", "Pfeiffer adapters with the lowest layers' adapters dropped", "Rücklé et al. 2021")
def adapterdrop(size: int = 48, drop: int = 5) -> Spec:
    """AdapterDrop's specialised setting: no adapter in the first ``drop`` layers (5 of BERT-base's 12 keep most of
    the accuracy and speed up training and inference), Pfeiffer adapters above. Layers count encoder then decoder."""
    need_int("drop", drop, 0)
    spec = pfeiffer(size)
    if drop:
        spec.layers[f"0-{drop - 1}"] = {"after_ffn": None}
    return spec


@method("parallel", "scaled parallel adapter beside the FFN", "He et al. 2022")
def parallel(size: int = 512, scaling: float = 4.0) -> Spec:
    return Spec(layers=_every_layer({"beside_ffn": _adapter(size, scaling=scaling)}))


def _prefix(length: int, hidden: int) -> PrefixSettings:
    s = PrefixSettings(length=length, hidden=hidden)
    s.check_at()
    return s


def _prefix_sites(p: PrefixSettings) -> dict[str, PrefixSettings]:
    """Every attention of a block: self-attention, and cross-attention where the block has it (Li & Liang prefix
    the encoder, the decoder and the decoder's cross-attention of an encoder-decoder)."""
    return dict.fromkeys(PREFIX_SITES, p)


@method("prefix", "MLP-reparameterised prefix keys/values in every attention of every layer", "Li & Liang 2021")
def prefix(length: int = 10, hidden: int = 512, layers: list[int] | None = None) -> Spec:
    """Prefix tuning; ``layers`` restricts it to some layers (default: all). On encoder-decoders the encoder's and
    the decoder's self-attention and the decoder's cross-attention each get prefixes from an MLP of their own."""
    p = _prefix(length, hidden)
    if layers is None:
        return Spec(layers=_every_layer(_prefix_sites(p)))
    return Spec(layers={str(i): _prefix_sites(p) for i in layers})


@method("adaptive-prefix", "prefix tuning with token- and layer-level gates on the prefixes", "Zhang et al. 2023")
def adaptive_prefix(length: int = 10, hidden: int = 512) -> Spec:
    """Adaptive prefix tuning in every attention of every layer: each prefix scaled by a trained scalar and by a
    sigmoid gate per prefix token computed from its attention's input."""
    s = AdaptivePrefixSettings(length=length, hidden=hidden)
    s.check_at()
    return Spec(layers=_every_layer(_prefix_sites(s)))


@method(
    "prompt",
    "soft prompt prepended to the input embeddings; SPoT: train with --init-from a prompt of another task",
    "Lester et al. 2021; SPoT: Vu et al. 2022",
)
def prompt(length: int = 20, init: str = "vocab") -> Spec:
    """Prompt tuning. SPoT (Vu et al. 2022) is this preset started from a prompt trained on another task:
    ``peftlab train --method prompt --init-from ADAPTER`` (the lengths must match)."""
    s = PromptSettings(length=length, init=init)
    s.check_at()
    return Spec(model={"input": s})


@method("ia3", "learned rescaling of keys, values and FFN activations", "Liu et al. 2022")
def ia3(targets: str | list[str] = ("k", "v", "ffn_out", "cross_k", "cross_v")) -> Spec:
    return Spec(layers=_every_layer(dict.fromkeys(parse_targets(targets), IA3Settings())))


@method("bitfit", "train only the bias terms", "Ben Zaken et al. 2022")
def bitfit() -> Spec:
    """Biases of every block and of the backbone outside the blocks (embedding norm, pooler): the count
    the BitFit and UniPELT papers report (103K on BERT-base)."""
    b = BitFitSettings()
    return Spec(layers=_every_layer({"bias": b}), model={"bias": b})


@method("ln", "train only the LayerNorm gains and biases", "Zhao et al. 2023")
def ln() -> Spec:
    n = LNSettings()
    return Spec(layers=_every_layer({"norm": n}), model={"embed_norm": n, "final_norm": n})


@method("krona", "Kronecker-product update A ⊗ B on chosen linears", "Edalati et al. 2022")
def krona(targets: str | list[str] = "qv", scale: float = 1.0) -> Spec:
    s = KronaSettings(scale=scale)
    return _at_targets(s, targets)


@method("vera", "frozen shared random B·A, trained scaling vectors b and d", "Kopiczko et al. 2024")
def vera(
    r: int = 256, targets: str | list[str] = "qv", d_initial: float = 0.1, seed: int = 0, save_projection: bool = True
) -> Spec:
    """VeRA on ``targets`` of every layer: one frozen random pair (A, B) for the adapter, sized to its largest site
    and saved with it (``save_projection=False``: drawn again from ``seed`` on load); per site a scaling vector d (r)
    and b (out). r=256 is peft's default (the paper's GLUE runs: 1024 on RoBERTa-base, 256 on -large)."""
    s = VeraSettings(r=r, d_initial=d_initial, seed=seed, save_projection=save_projection)
    return _at_targets(s, targets)


@method("fourierft", "n trained spectral coefficients, dW = scaling·IDFT2", "Gao et al. 2024")
def fourierft(
    n_frequency: int = 1000, scaling: float = 150.0, targets: str | list[str] = "qv", seed: int = 777,
    init: str = "zeros",
) -> Spec:  # fmt: skip
    """FourierFT on query and value (the paper's GLUE setting, n=1000, scaling 150 as peft's defaults); the spectrum
    starts at zero (init='normal': the paper's standard-normal start, which changes the model before training)."""
    s = FourierFTSettings(n_frequency=n_frequency, scaling=scaling, seed=seed, init=init)
    return _at_targets(s, targets)


@method("loha", "Hadamard product of two low-rank updates on chosen linears", "Hyeon-Woo et al. 2022")
def loha(r: int = 8, alpha: float = 8.0, targets: str | list[str] = "qv") -> Spec:
    """LoHa with peft's defaults (r=8, alpha=8) on query and value, like LoRA."""
    s = LohaSettings(r=r, alpha=alpha)
    return _at_targets(s, targets)


@method("lokr", "Kronecker product W1 ⊗ W2 (W2 low rank) on chosen linears", "Yeh et al. 2024 (LyCORIS)")
def lokr(
    r: int = 8, alpha: float = 8.0, targets: str | list[str] = "qv", decompose_both: bool = False,
    decompose_factor: int = -1,
) -> Spec:  # fmt: skip
    """LoKr with peft's defaults (r=8, alpha=8, balanced factors) on query and value, like LoRA."""
    s = LokrSettings(r=r, alpha=alpha, decompose_both=decompose_both, decompose_factor=decompose_factor)
    return _at_targets(s, targets)


@method("sparse-adapter", "Houlsby adapters pruned at initialisation, the mask fixed", "He et al. 2022")
def sparse_adapter(
    size: int = 64, sparsity: float = 0.4, prune: str = "snip", samples: int = 320, seed: int = 0
) -> Spec:
    """SparseAdapter on Houlsby's placement (after attention and FFN), the paper's Large-Sparse setting: a wider
    adapter with 40% of its weight entries pruned by SNIP on ``samples`` training examples before the first step
    (the paper's choice); counts hold the kept entries (and, stored, their positions)."""
    s = SparseAdapterSettings(size=size, sparsity=sparsity, prune=prune, samples=samples, seed=seed)
    s.check_at()
    return Spec(layers=_every_layer({"after_attn": s, "after_ffn": s}))


@method("krona-res", "KronA^B_res: Kronecker adapter beside the FFN, scaled, with a residual", "Edalati et al. 2022")
def krona_res(scale: float = 1.0, residual: bool = True, a_out: int = 0, a_in: int = 0) -> Spec:
    """FFN(x) + scale·x(A ⊗ B) + x beside every FFN; the residual + x changes the model at init, as in the paper
    (``residual=False``: the KronA^B adapter, unchanged at init)."""
    s = KronaResSettings(a_out=a_out, a_in=a_in, scale=scale, residual=residual)
    s.check_at()
    return Spec(layers=_every_layer({"beside_ffn": s}))


@method("lst", "side network on the frozen backbone's detached states: no backward through it", "Sung et al. 2022")
def lst(reduction: int = 8, temperature: float = 0.1, activation: str = "gelu") -> Spec:
    """Ladder Side-Tuning: one side block per layer (of the decoder in T5), ``reduction`` 8 and gate temperature 0.1
    as in the paper; the side network's output is added to the backbone's final hidden state (see
    :mod:`peftlab.modules.side`)."""
    s = LstSettings(reduction=reduction, temperature=temperature, activation=activation)
    s.check_at()
    return Spec(model={"side": s})


@method("oft", "block-diagonal orthogonal (Cayley) rotation of the inputs of chosen linears", "Qiu et al. 2023")
def oft(
    block_size: int = 32,
    r: int = 0,
    targets: str | list[str] = "qv",
    coft: bool = False,
    eps: float = 6e-5,
    block_share: bool = False,
    module_dropout: float = 0.0,
) -> Spec:
    """OFT on ``targets`` (peft's defaults: blocks of 32 on query and value; give ``r`` with ``block_size=0`` to fix
    the number of blocks instead)."""
    s = OftSettings(
        r=r, block_size=block_size, coft=coft, eps=eps, block_share=block_share, module_dropout=module_dropout
    )
    return _at_targets(s, targets)


@method("boft", "butterfly-factorised orthogonal rotation and output scaling of chosen linears", "Liu et al. 2024")
def boft(
    block_size: int = 4,
    block_num: int = 0,
    butterfly_factor: int = 2,
    targets: str | list[str] = "qv",
    dropout: float = 0.0,
) -> Spec:
    """BOFT on ``targets`` (query and value; blocks of 4 as peft, two butterfly factors as the paper's language
    experiments)."""
    s = BoftSettings(block_size=block_size, block_num=block_num, butterfly_factor=butterfly_factor, dropout=dropout)
    return _at_targets(s, targets)


@method("hra", "product of r Householder reflections of the inputs of chosen linears", "Yuan et al. 2024")
def hra(r: int = 8, targets: str | list[str] = "qv", apply_gs: bool = False) -> Spec:
    """HRA on ``targets`` (r=8 reflections, peft's default, on query and value)."""
    s = HraSettings(r=r, apply_gs=apply_gs)
    return _at_targets(s, targets)


@method("adalora", "SVD-form LoRA whose ranks are pruned by importance to a budget", "Zhang et al. 2023")
def adalora(
    init_r: int = 12, target_r: int = 8, alpha: float = 8.0, targets: str | list[str] = "all-linear", tinit: int = 0,
    tfinal: int = 0, deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85, orth_reg_weight: float = 0.5,
    total_step: int = 0, dropout: float = 0.0,
) -> Spec:  # fmt: skip
    """AdaLoRA on every weight matrix (the paper's setting) with peft's ``AdaLoraConfig`` defaults: rank 12 per matrix
    pruned to 8 on average; ``total_step`` 0 takes the run's length (``peftlab train`` calls the schedule each step)."""
    s = AdaLoraSettings(
        init_r=init_r, target_r=target_r, alpha=alpha, dropout=dropout, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
        beta1=beta1, beta2=beta2, orth_reg_weight=orth_reg_weight, total_step=total_step,
    )  # fmt: skip
    return _at_targets(s, targets)


@method("intrinsic-said", "every weight moves in one random d-dim subspace (Fastfood), a scale per matrix",
        "Aghajanyan et al. 2021")  # fmt: skip
def intrinsic_said(d: int = 1000, targets: str | list[str] = "all-linear", seed: int = 0) -> Spec:
    """Structure-aware intrinsic SAID on every linear weight of every block: one trained vector of ``d`` entries,
    projected to each matrix by its own Fastfood transform, and one trained scale per matrix."""
    s = IntrinsicSaidSettings(d=d, seed=seed)
    return _at_targets(s, targets)


@method("glora", "generalised LoRA: low-rank weight scale and shift, vector bias terms", "Chavan et al. 2023")
def glora(r: int = 4, targets: str | list[str] = "all-linear") -> Spec:
    """GLoRA on every linear, one fixed point of its search space: A and B low rank (r), C, D and E vectors."""
    s = GloraSettings(r=r)
    return _at_targets(s, targets)


@method("fuse", "attention over several trained bottleneck adapters (AdapterFusion)", "Pfeiffer et al. 2021")
def fuse(adapters: list[str] | None = None, temperature: float = 1.0) -> Spec:
    """AdapterFusion of the adapters saved in the folders ``adapters`` (two or more, trained on the same base model
    with the same placement): they are frozen, a query/key/value attention over their outputs is trained per site,
    and a new task head."""
    return Spec(layers=fuse_layers(adapters, temperature))


def _compacter(size: int, n: int, rank: int, placement: Placement = HOULSBY) -> CompacterSettings:
    """GELU, as the paper's code and AdapterHub's Compacter configs."""
    s = CompacterSettings(size=size, n=n, rank=rank, activation="gelu", **asdict(placement))
    s.check_at()
    return s


@method("compacter", "Kronecker/low-rank adapters after attention and FFN", "Karimi Mahabadi et al. 2021")
def compacter(size: int = 48, n: int = 4, rank: int = 1) -> Spec:
    """Houlsby's placement, after attention and after the FFN (AdapterHub's ``DoubleSeqBn`` Compacter)."""
    c = _compacter(size, n, rank)
    return Spec(layers=_every_layer({"after_attn": c, "after_ffn": c}))


@method("compacter++", "one Compacter adapter after the FFN", "Karimi Mahabadi et al. 2021")
def compacter_pp(size: int = 48, n: int = 4, rank: int = 1) -> Spec:
    """After the FFN only, on Pfeiffer's placement (reads the FFN block's output after its LayerNorm), as the paper
    drops the attention adapter following Pfeiffer et al. and AdapterHub's ``CompacterPlusPlusConfig`` places it."""
    return Spec(layers=_every_layer({"after_ffn": _compacter(size, n, rank, PFEIFFER)}))


@method("adamix", "mixture of adapter experts, averaged for inference", "Wang et al. 2022")
def adamix(size: int = 16, experts: int = 4) -> Spec:
    s = AdaMixSettings(size=size, experts=experts)
    s.check_at()
    return Spec(layers=_every_layer({"after_ffn": s}))


@method("mam", "parallel adapter beside the FFN + prefix tuning", "He et al. 2022")
def mam(size: int = 512, scaling: float = 4.0, prefix_length: int = 30, prefix_hidden: int = 512) -> Spec:
    return Spec(
        layers=_every_layer(
            {"beside_ffn": _adapter(size, scaling=scaling)} | _prefix_sites(_prefix(prefix_length, prefix_hidden))
        )
    )


def _unipelt(
    size: int,
    prefix_length: int,
    prefix_hidden: int,
    r: int | None,
    alpha: float,
    gates: bool,
    lora_sites: tuple[str, ...] = ("q", "v"),
    gate_per_site: bool = False,
) -> Spec:
    """UniPELT's submodules: the adapter on h_FN (Pfeiffer's placement, the paper's Sec. 3), the prefix (every
    attention, as :func:`prefix`), and LoRA on ``lora_sites`` unless ``r`` is None."""
    sites = {"after_ffn": _adapter(size, placement=PFEIFFER)} | _prefix_sites(_prefix(prefix_length, prefix_hidden))
    if r is not None:
        lo = LoraSettings(r=r, alpha=alpha, gate_per_site=gate_per_site)
        lo.check_at()
        sites |= dict.fromkeys(lora_sites, lo)
    return Spec(layers=_every_layer(sites), gates=gates)


@method("unipelt", "gated adapter + prefix + LoRA", "Mao et al. 2022")
def unipelt(size: int = 48, prefix_length: int = 10, prefix_hidden: int = 512, r: int = 8, alpha: float = 16.0) -> Spec:
    """UniPELT (APL): each submodule gated per layer; the LoRA gate replaces its fixed scaling. Gates average over the
    real tokens (a running mean in decoders)."""
    return _unipelt(size, prefix_length, prefix_hidden, r, alpha, gates=True)


@method("unipelt-ap", "gated adapter + prefix (UniPELT (AP))", "Mao et al. 2022")
def unipelt_ap(size: int = 48, prefix_length: int = 10, prefix_hidden: int = 512) -> Spec:
    """UniPELT (AP), the paper's two-submodule variant: gated adapter and prefix, no LoRA."""
    return _unipelt(size, prefix_length, prefix_hidden, None, 16.0, gates=True)


@method("unipelt-nogate", "adapter + prefix + LoRA without gates (UniPELT's ablation)", "Mao et al. 2022")
def unipelt_nogate(
    size: int = 48, prefix_length: int = 10, prefix_hidden: int = 512, r: int = 8, alpha: float = 16.0
) -> Spec:
    """UniPELT's submodules combined without gates: the gating ablation (LoRA keeps its fixed alpha/r)."""
    return _unipelt(size, prefix_length, prefix_hidden, r, alpha, gates=False)


@method("fishmask", "train a fixed sparse mask: the top-Fisher entries of the linear weights", "Sung et al. 2021")
def fishmask(
    density: float = 0.005, samples: int = 1024, targets: str | list[str] = "all-linear", seed: int = 0
) -> Spec:
    """FishMask: ``density`` (0.5%, the paper's GLUE setting) of every linear weight's entries taken together, those
    with the largest Fisher information on ``samples`` training examples; without data a seeded random mask."""
    s = FishMaskSettings(density=density, samples=samples, seed=seed)
    return _at_targets(s, targets)


@method("lt-sft", "train the entries a short full fine-tuning moved most", "Ansell et al. 2022")
def lt_sft(
    density: float = 0.005, steps: int = 100, lr: float = 2e-5, targets: str | list[str] = "all-linear", seed: int = 0
) -> Spec:
    """LT-SFT: a ``steps``-step full fine-tuning finds the ``density`` entries of the linear weights that moved most;
    the weights go back and only those entries train. Without data a seeded random mask."""
    s = LtSftSettings(density=density, steps=steps, lr=lr, seed=seed)
    return _at_targets(s, targets)


@method("diffpruning", "dense diff with L0 hard-concrete gates, pruned to a sparse update", "Guo et al. 2021")
def diffpruning(
    density: float = 0.005,
    alpha_init: float = 5.0,
    fixed_fraction: float = 0.25,
    targets: str | list[str] = "all-linear",
) -> Spec:
    """DiffPruning on every linear weight: the final update keeps ``density`` (0.5%) of each weight's entries; the
    last ``fixed_fraction`` of the steps trains that fixed mask without the penalty (the paper's second phase)."""
    s = DiffPruningSettings(density=density, alpha_init=alpha_init, fixed_fraction=fixed_fraction)
    return _at_targets(s, targets)


@method("topk-layers", "tune only the top k blocks of each stack (their linears and norms)", "Lee et al. 2019")
def topk_layers(k: int = 3) -> Spec:
    """Every tensor of the ``k`` last blocks of each stack (their linear weights and biases, their norms) and the
    final norm, as zero-initialised deltas (T5's relative position table in its first block is not among them)."""
    s = UnfreezeSettings(top=k)
    s.check_at()
    return Spec(layers=_every_layer(dict.fromkeys((*_ALL_LINEAR, "norm"), s)), model={"final_norm": UnfreezeSettings()})


@method("cross-attn", "tune only the decoder's cross-attention (encoder-decoders)", "Gheini et al. 2021")
def cross_attn() -> Spec:
    """The cross-attention projections of every decoder block; a model without cross-attention is refused."""
    return Spec(layers=_every_layer(dict.fromkeys(("cross_q", "cross_k", "cross_v", "cross_o"), UnfreezeSettings())))


@method("difffit", "biases, norms and a scale factor on each residual branch", "Xie et al. 2023")
def difffit() -> Spec:
    """DiffFit: every bias, every norm, and gamma (per channel, from 1) on the attention, cross-attention and FFN
    output projections."""
    bias, scaled = DiffFitSettings(), DiffFitSettings(scale=True)
    sites = {site: scaled if site in ("o", "cross_o", "ffn_out") else bias for site in _ALL_LINEAR}
    n = LNSettings()
    return Spec(layers=_every_layer(sites | {"norm": n}), model={"embed_norm": n, "final_norm": n})


_SURVEY = "the survey's Table 5 (Lialin et al. 2023)"
_CROSS_QV = ("q", "v", "cross_q", "cross_v")


@method("houlsby-64", "Houlsby adapters of size 64, the survey's setting", _SURVEY)
def houlsby_64() -> Spec:
    return houlsby(size=64)


@method("pfeiffer-64", "Pfeiffer adapters of size 64, the survey's setting", _SURVEY)
def pfeiffer_64() -> Spec:
    return pfeiffer(size=64)


@method(
    "lora-qv",
    "LoRA r 8 on every query and value, cross-attention's included (what peft's and AdapterHub's q,v select on T5)",
    _SURVEY,
)
def lora_qv(r: int = 8, alpha: float = 16.0) -> Spec:
    return lora(r=r, alpha=alpha, targets=list(_CROSS_QV))


@method("lora-all", "LoRA r 8 on every linear of every block, the survey's 'LoRA (all)'", _SURVEY)
def lora_all(r: int = 8, alpha: float = 16.0) -> Spec:
    return lora(r=r, alpha=alpha, targets="all-linear")


@method("prefix-survey", "prefix tuning of length 30, MLP 512 wide (AdapterHub's PrefixTuningConfig)", _SURVEY)
def prefix_survey(length: int = 30, hidden: int = 512) -> Spec:
    """The survey's prefix tuning: AdapterHub's defaults, which it kept (on T5 three locations, each with its own
    embedding and MLP, as :func:`prefix`)."""
    return prefix(length=length, hidden=hidden)


@method("mam-survey", "MAM with AdapterHub's MAMConfig: prefix length 30, MLP 800 wide, parallel adapter 512", _SURVEY)
def mam_survey(size: int = 512, scaling: float = 4.0, prefix_length: int = 30, prefix_hidden: int = 800) -> Spec:
    """:func:`mam` with AdapterHub's prefix MLP width (``bottleneck_size=800``), which the survey ran."""
    return mam(size=size, scaling=scaling, prefix_length=prefix_length, prefix_hidden=prefix_hidden)


@method(
    "unipelt-survey",
    "UniPELT with AdapterHub's UniPELTConfig: adapter 64 (reduction 16), prefix 10, LoRA r 8 on every q and v, "
    "a gate per module",
    _SURVEY,
)
def unipelt_survey(
    size: int = 64, prefix_length: int = 10, prefix_hidden: int = 512, r: int = 8, alpha: float = 16.0
) -> Spec:
    """AdapterHub's UniPELT on T5-Large: the adapter at reduction 16 (64 wide), LoRA on every query and value,
    cross-attention's included, and one gate per gated module (per LoRA site, per prefix attention, per adapter)
    where :func:`unipelt` shares one LoRA gate per layer as the paper does."""
    return _unipelt(size, prefix_length, prefix_hidden, r, alpha, gates=True, lora_sites=_CROSS_QV, gate_per_site=True)


#: Presets that need the model: its depth for their layer groups, its sizes to meet a parameter budget. They
#: are called as ``make(num_layers, model, **kwargs)`` and kept out of :data:`METHODS`, whose presets build
#: without a model.
MODEL_METHODS: dict[str, Method] = {}


def s4(num_layers: int, model: str | nn.Module | Backbone, budget: float = 0.005, bitfit: bool = True) -> Spec:
    """The S4 configuration found on T5-base (Chen et al. 2023): layers in four spindle groups
    (N1 < N2 = N3 > N4, e.g. 2,4,4,2 for 12 layers), all tuned, ``budget`` (a fraction of the backbone's
    parameters, 0.5% as in the paper) spread uniformly over the layers; G1 adapter + LoRA, G2 adapter +
    prefix, G3 adapter + prefix + BitFit, G4 prefix + BitFit + LoRA (adapter: serial after the FFN; LoRA
    on q and v; prefix key/values stored directly). See :mod:`peftlab.space` for the grouping and sizing.

    ``num_layers`` is the model's depth in blocks, encoder and decoder together (24 for T5-base); the CLI
    passes the model's. ``model`` (a name such as 'shape:t5-base', the model or its Backbone) gives the exact module
    costs that turn the budget into adapter sizes, LoRA ranks and prefix lengths. BitFit needs biases:
    on bias-free backbones (T5, where S4 was found, and Llama) pass ``bitfit=False``, which drops it
    (G3: adapter + prefix, G4: prefix + LoRA); with ``bitfit=True`` such a model is refused, never silently
    changed.
    """

    backbone = Backbone.of(model)
    if num_layers != backbone.num_layers:
        raise SpecError(
            f"s4: num_layers={num_layers} but the model has {backbone.num_layers} blocks "
            "(encoder and decoder blocks count together); pass its depth"
        )
    if bitfit and not backbone.blocks[0].biases():
        raise SpecError(
            "s4: this model's blocks have no biases (T5 and Llama are bias-free), so BitFit in G3 "
            "and G4 cannot apply; pass bitfit=False to drop it"
        )
    choice = S4_CHOICE
    if not bitfit:
        choice = replace(choice, strategies=tuple(tuple(n for n in g if n != "bitfit") for g in choice.strategies))
    spec = design_spec(choice, backbone, budget)
    spec.method = "s4"
    return spec


MODEL_METHODS["s4"] = Method(
    "s4", s4, "S4 design: spindle groups; G1 A+L, G2 A+P, G3 A+P+B, G4 P+B+L", "Chen et al. 2023"
)


@method("full", "full fine-tuning (baseline)", "")
def full() -> Spec:
    return Spec(full=True)


@method("head", "train only the task head (baseline)", "")
def head() -> Spec:
    return Spec()


def get(name: str, **kwargs) -> Spec:
    """The spec of a method by name, with a clear error for unknown names or arguments."""
    if name in MODEL_METHODS:
        raise SpecError(f"method '{name}' is sized for a model: call methods.for_model('{name}', model)")
    if name not in METHODS:
        raise SpecError(f"unknown method '{name}'; methods are: {', '.join([*METHODS, *MODEL_METHODS])}")
    try:
        return METHODS[name].make(**kwargs)
    except TypeError as e:
        raise SpecError(f"method '{name}': {e}") from None


def for_model(name: str, model: str | nn.Module | Backbone, **kwargs) -> Spec:
    """The spec of any method by name, sized for ``model`` where the method needs it (s4): the one entry
    point for callers that know the model (the CLI, ``peftlab bench``)."""
    if name not in MODEL_METHODS:
        return get(name, **kwargs)

    backbone = Backbone.of(model)
    try:
        return MODEL_METHODS[name].make(backbone.num_layers, backbone, **kwargs)
    except TypeError as e:
        raise SpecError(f"method '{name}': {e}") from None


def settings_of(name: str) -> list[str]:
    """The settings a preset takes (its keyword arguments; an s4 preset's model and depth come from the model):
    what ``--set`` and ``peftlab bench --methods`` may give, named in their errors."""
    if name in MODEL_METHODS:
        return list(inspect.signature(MODEL_METHODS[name].make).parameters)[2:]
    if name not in METHODS:
        raise SpecError(f"unknown method '{name}'; methods are: {', '.join([*METHODS, *MODEL_METHODS])}")
    return list(inspect.signature(METHODS[name].make).parameters)


def parse_settings(pairs: Sequence[str], where: str = "--set") -> dict:
    """``["r=16", "targets=qkv"]`` -> {"r": 16, "targets": "qkv"}: Python literals, else strings. The one reading of
    method settings written as text (``peftlab train --set``, ``peftlab bench --methods``); ``where`` names the
    source in the error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"{where} expects KEY=VALUE, got '{pair}'")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out
