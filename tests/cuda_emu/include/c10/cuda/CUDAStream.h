// CUDA emulation: see fs_cuda_emu/torch_shim.h.
#pragma once
#include "fs_cuda_emu/torch_shim.h"
