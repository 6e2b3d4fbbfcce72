"""Messages and their lifecycle: models, transitions, the API, dispatch tasks, admin and commands."""
