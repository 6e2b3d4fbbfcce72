"""Sandbox provider: an HTTP server speaking the providers' wire formats, with fault controls."""
