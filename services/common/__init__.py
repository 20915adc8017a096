"""Shared runtime of every knowserve gRPC service: settings, errors, server factory, metrics, clients."""
