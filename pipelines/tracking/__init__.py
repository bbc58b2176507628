"""Every MLflow call of the project (see docs/architecture.md)."""

import os

# MLflow prints "View run ... at: <address>" when a run on a tracking server ends, an
# address that opens the UI's GenAI view; the project prints its own, in the model-training
# view (pipelines/tracking/links.py). Set here, before any MLflow call of this process (and
# of the local Ray workers it starts, which inherit it); a value the user set wins.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
