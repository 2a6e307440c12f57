"""Model lifecycle: the registry, the retrain decision and lock, champion/challenger, the inbox watcher."""
