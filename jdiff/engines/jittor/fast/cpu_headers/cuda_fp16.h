// See cuda_runtime.h beside this file: included by Jittor's vcompiler.cc, nothing from it is used on the CPU.
#pragma once
