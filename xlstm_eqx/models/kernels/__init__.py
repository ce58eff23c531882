"""mLSTM cell kernels: three exact forms of one recurrence, for one head of one sequence.

All share the signature ``(q, k, v, i_preact, f_preact, initial_state=None, reset=None, *, eps)
-> (h, final_state)`` (chunkwise adds ``chunk_size``); vmap them over heads and batch.
"""

from .chunkwise import chunkwise
from .common import MLSTMState, zero_state
from .parallel import parallel
from .recurrent import recurrent, recurrent_step

KERNELS = {"parallel": parallel, "chunkwise": chunkwise, "recurrent": recurrent}

__all__ = ["KERNELS", "MLSTMState", "chunkwise", "parallel", "recurrent", "recurrent_step", "zero_state"]
