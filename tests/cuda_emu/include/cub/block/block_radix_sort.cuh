// CUDA emulation: see fs_cuda_emu/cub.h.
#pragma once
#include "fs_cuda_emu/cub.h"
