"""Settings entry point: everything comes from the environment (12-factor), see base.py."""
from conductor_project.settings.base import *  # noqa: F401,F403
