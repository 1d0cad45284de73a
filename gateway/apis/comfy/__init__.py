"""ComfyUI's server API: prompts from graphs, history, view, queue, the WebSocket."""
