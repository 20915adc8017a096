"""knowserve services: retrieval, verification, reward, generation, training (one folder each) and their shared runtime."""
