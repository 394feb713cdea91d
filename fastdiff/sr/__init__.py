"""Super-resolution: bundled photographs with a fixed split, x4 degradation, bicubic baseline and Y-channel metrics."""
