// Emulation build only: see mtlfast_cuda_emulation.h.
#pragma once
#include "mtlfast_cuda_emulation.h"
