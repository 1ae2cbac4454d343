"""ComfyUI instances: the HTTP/websocket client, the instance agents, workflows and
file hand-off."""
