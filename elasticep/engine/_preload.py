"""Imported once by the :mod:`~elasticep.engine.zygote`, so that every rank forked from it starts warm.

Importing torch and transformers' DeepSeek-V3 code takes seconds of CPU; paid here once, a rank
(or a restarted one) is serving in milliseconds. Importing does not start torch's thread pools,
so forking afterwards is safe.
"""

import safetensors.torch  # noqa: F401
import torch  # noqa: F401
import torch.distributed  # noqa: F401
import transformers.models.deepseek_v3.modeling_deepseek_v3  # noqa: F401
import zmq  # noqa: F401

import elasticep.engine.ep  # noqa: F401
import elasticep.engine.model  # noqa: F401
import elasticep.engine.rank  # noqa: F401
import elasticep.eplb.placement  # noqa: F401
