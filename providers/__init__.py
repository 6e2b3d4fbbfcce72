"""Provider adapters behind one small interface, the registry, and the sandbox provider."""
