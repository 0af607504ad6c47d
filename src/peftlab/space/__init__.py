"""Design spaces (S4) and search spaces (AutoPEFT): generators of specs, as data.

A space is a set of specs with coordinates. Each space lists its :class:`Dimension` s; a point is a vector
holding, per dimension, the *index* of the chosen value in that dimension's choices (an insertion bit is
0/1, a size on a binary log scale is its position on that scale). ``decode(vector)`` turns a point into a
:class:`~peftlab.core.spec.Spec`, ``encode`` goes back, ``size`` is the number of points (the product of the
dimensions' cardinalities, the way AutoPEFT counts its space, so points that build the same model are
counted separately). Spaces are JSON (YAML when PyYAML is installed) and two kinds exist:

**Layer spaces** (``type: "layers"``; the built-in ``autopeft``, Zhou et al. 2024). An insertion bit per
searchable layer, and per module a size choice shared by every inserted layer; size 0 turns the module off.
``autopeft`` is the paper's space: a serial adapter after the FFN, a parallel adapter beside it (scaled by
4, as AdapterHub's) and prefix tuning, each sized on ``{0} ∪ {2^k ≤ hidden}`` (0, 1, 2, ..., 512 on
BERT-base: 11 values, 2^12·11^3 = 5,451,776 configurations, the paper's count). A user file names the
modules (kind, sites, the setting the size sets, its choices, fixed settings) and the layers::

    {"type": "layers", "num_layers": 12, "layers": [4, 5, 6, 7, 8, 9, 10, 11],
     "modules": [{"name": "lora", "kind": "lora", "sites": ["q", "v"], "size": "r", "choices": [0, 4, 8, 16]},
                 {"name": "bitfit", "kind": "bitfit", "sites": ["bias"], "choices": [0, 1]}]}

A module without ``size`` (BitFit, LN, (IA)3) is switched by choices ``[0, 1]``. ``num_layers`` may be left
out when a model is given; ``layers`` defaults to every layer.

**S4 design spaces** (``type: "s4"``; the built-in ``s4``, Chen et al. 2023) have four components:

- *layer grouping*: the L blocks (numbered as in specs: T5's encoder, then its decoder) split into G
  consecutive groups (default 4) of sizes N1..NG, by :func:`group_sizes`:

  - ``uniform``: N = L // G each, the L mod G extra layers one each to the last groups (equal when G | L);
  - ``increasing`` (N1 < N2 < ... < NG): the gentlest such split, a + i for group i (a = (L - G(G-1)/2) // G),
    the remainder one each to the last groups; needs L >= G(G+1)/2 (10 for G = 4). ``decreasing``: reversed;
  - ``spindle`` (N1 < N2 = ... = N(G-1) > NG): middle groups of M = ceil((L+2)/G), the smallest M whose ends
    fit below it, and the rest E = L - (G-2)M split over the ends as E//2 and E - E//2 (L = 12: 2,4,4,2;
    L = 24: 5,7,7,5);
  - ``bottleneck`` (N1 > N2 = ... = N(G-1) < NG): middle groups of M = (L-2) // G, the largest M whose ends
    fit above it, ends as for spindle (L = 12: 4,2,2,4).

  A pattern that no split of L satisfies (spindle at L = 7, increasing at L < 10) raises a ``SpecError``
  naming the patterns that do fit; spindle and bottleneck need G >= 3.
- *parameter allocation* under a trainable budget (a fraction of the backbone's parameters, default
  0.5%). Fixed-size modules (BitFit, LN, (IA)3) cost what they cost; the rest of the budget goes to the
  layers of the tuned groups by weight (``increasing``: layer i weighs i+1, ``decreasing``: L-i,
  ``uniform``: 1), and within a layer equally to its sized modules. A size comes from the module's exact
  cost at that layer, measured by building it on the meta device (cost = a·size + c): adapter bottleneck,
  LoRA rank, prefix length. Rounding is error-diffused along the layers, per strategy (so sizes within a
  uniform group differ by at most one), and the total lands within half a size unit per strategy of the
  budget (a few thousand parameters on BERT-base: under 1% of a 0.5% budget). Where even size 1
  exceeds a module's share (tiny models), it gets size 1 and the budget is exceeded. Shared parameters
  (Compacter's rules, a reparameterised prefix's shared MLP input) are outside the allocation; S4's prefix
  strategy stores key/values directly (``reparam=False``): the MLP alone costs 2·kv·hidden per layer,
  more than a 0.5% budget holds.
- *tuned groups*: which groups get modules (a non-empty set of group numbers, 1-based as G1..G4);
- *strategy assignment*: per group a set of strategies (:data:`STRATEGIES`: ``adapter`` = serial
  adapter after the FFN, ``prefix``, ``bitfit``, ``lora`` on q and v, and ``parallel``, ``ln``, ``ia3``;
  any other kind as a :class:`Strategy`), sets whose strategies share a site excluded.

Progressive refinement (the search itself comes later): S4's stages are the dimensions, in the order of
:meth:`DesignSpace.stages` (grouping, allocation, tuned, then the strategies of G1, G2, ...). A stage's
candidates (:meth:`DesignSpace.candidates`) are the sub-spaces that fix that dimension to each of its
values, every other dimension left as it is (random when sampled). The greedy step samples on the order of
100 specs from each candidate, trains them briefly, and keeps the best candidate as the next space.
"""

from peftlab.space.backbone import Backbone
from peftlab.space.base import Dimension, SearchSpace
from peftlab.space.design import S4_CHOICE, DesignChoice, allocate, design_spec
from peftlab.space.files import BUILTIN_SPACES, load_space
from peftlab.space.layers import LayerModule, LayerSpace, log2_choices
from peftlab.space.patterns import (
    ALLOCATIONS,
    GROUPINGS,
    allocation_weights,
    feasible_groupings,
    group_layers,
    group_sizes,
)
from peftlab.space.s4 import DesignSpace
from peftlab.space.strategies import S4_STRATEGIES, STRATEGIES, Strategy

__all__ = [
    "ALLOCATIONS",
    "BUILTIN_SPACES",
    "GROUPINGS",
    "S4_CHOICE",
    "S4_STRATEGIES",
    "STRATEGIES",
    "Backbone",
    "DesignChoice",
    "DesignSpace",
    "Dimension",
    "LayerModule",
    "LayerSpace",
    "SearchSpace",
    "Strategy",
    "allocate",
    "allocation_weights",
    "design_spec",
    "feasible_groupings",
    "group_layers",
    "group_sizes",
    "load_space",
    "log2_choices",
]
