"""Images: decode and preprocess, the resize cache and its parallel fan-out, filter verdicts, perceptual hashes."""
