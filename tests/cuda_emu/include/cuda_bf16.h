// CUDA emulation: see fs_cuda_emu/half.h.
#pragma once
#include "fs_cuda_emu/runtime.h"
