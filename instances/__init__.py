"""ComfyUI instances: the HTTP/websocket client, the instance pool and the simulator."""
