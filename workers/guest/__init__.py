"""The in-sandbox guest agent (agent.py, stdlib only) and the worker side of its channel."""
