"""The clients' suppression lists: who must not be sent to, fed by opt-outs, bounces and providers."""
