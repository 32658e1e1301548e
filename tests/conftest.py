import os

import torch

# Triton kernels run on CPU tensors through the interpreter where no GPU exists. It must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
