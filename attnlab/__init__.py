"""attnlab: attention mechanisms of the research literature behind one interface.

Every mechanism is a catalogue entry with a readable reference (the dense oracle with its
mask), fast implementations tested against it, and capability data::

    import attnlab
    m = attnlab.mechanism("neighborhood")
    out = m(q, k, v, kernel_size=7)            # fastest implementation that serves the call
    ref = m.reference(q, k, v, kernel_size=7)  # the definition
"""
from .catalogue import PATTERNS, Call, Implementation, Mechanism, Param, mechanism, mechanisms, register
from .patterns import Mask, ScoreMod, masked_attention
from .tiled import merge

__version__ = "0.1.0"

__all__ = ["PATTERNS", "Call", "Implementation", "Mechanism", "Param", "mechanism", "mechanisms", "register",
           "Mask", "ScoreMod", "masked_attention", "merge", "__version__"]
