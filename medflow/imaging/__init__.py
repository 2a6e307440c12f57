"""Images: decode and preprocess, the image store (resize output and cache) and its decoding fan-out, pHashes."""
