"""Model loading (device/dtype policy), adapters and fast kernels."""
