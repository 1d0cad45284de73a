"""ComfyUI's two websocket client flows, step for step as the scripts in ComfyUI's `script_examples`
folder run them (`websockets_api_example.py`, `websockets_api_example_ws_images.py`), with the same
libraries (websocket-client's blocking socket, urllib) and the same default graph, so that a test can
run them against this server. Only the server's address, the checkpoint's name and a bounded wait
differ from the scripts. Blocking: run them in a thread while the server serves in the test's loop.

- `images_through_history`: connect `/ws?clientId=`, queue at `/prompt` with that client id, read the
  socket (text messages parsed, binary frames skipped as previews) until `executing` with node null
  for the prompt, then read `/history/{id}` and fetch each output image with `/view`.
- `images_through_socket`: the graph ends in a `SaveImageWebsocket` node; queue at `/api/prompt`,
  track the node `executing` names, and keep every binary frame that comes while the SaveImageWebsocket
  node executes, less its 8-byte header.
"""

from __future__ import annotations

import copy
import json
import urllib.parse
import urllib.request
import uuid

import websocket

SOCKET_NODE = "save_image_websocket_node"  # the scripts' id for their SaveImageWebsocket node

DEFAULT_GRAPH = {  # ComfyUI's default text-to-image workflow, as the scripts send it
    "3": {"class_type": "KSampler", "inputs": {
        "cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0], "negative": ["7", 0], "positive": ["6", 0],
        "sampler_name": "euler", "scheduler": "normal", "seed": 8566257, "steps": 20}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 512, "width": 512}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "masterpiece best quality girl"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "bad hands"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
}


def graph(checkpoint: str, *, output: str) -> dict:
    """The default graph with the scripts' own changes (the text, seed 5), the server's checkpoint, and
    its output node: SaveImage as node 9, or SaveImageWebsocket under the scripts' node id."""
    prompt = copy.deepcopy(DEFAULT_GRAPH)
    prompt["4"]["inputs"]["ckpt_name"] = checkpoint
    prompt["6"]["inputs"]["text"] = "masterpiece best quality man"
    prompt["3"]["inputs"]["seed"] = 5
    if output == "SaveImage":
        prompt["9"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
    else:
        prompt[SOCKET_NODE] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["8", 0]}}
    return prompt


def queue(server: str, path: str, prompt: dict, client_id: str) -> dict:
    body = json.dumps({"prompt": prompt, "client_id": client_id}).encode("utf-8")
    return json.loads(urllib.request.urlopen(urllib.request.Request(f"http://{server}{path}", data=body)).read())


def connect(server: str, client_id: str, wait_s: float) -> websocket.WebSocket:
    ws = websocket.WebSocket()
    ws.connect(f"ws://{server}/ws?clientId={client_id}")
    ws.settimeout(wait_s)  # each recv waits at most this long
    return ws


def images_through_history(server: str, checkpoint: str, *, wait_s: float) -> tuple[str, dict[str, list[bytes]]]:
    """(prompt id, {output node: [image bytes]}) the way websockets_api_example.py gets them."""
    client_id = str(uuid.uuid4())
    ws = connect(server, client_id, wait_s)
    try:
        prompt_id = queue(server, "/prompt", graph(checkpoint, output="SaveImage"), client_id)["prompt_id"]
        while True:
            out = ws.recv()
            if not isinstance(out, str):
                continue  # previews are binary data
            message = json.loads(out)
            if message["type"] == "executing" and message["data"]["node"] is None and message["data"]["prompt_id"] == prompt_id:
                break
    finally:
        ws.close()
    with urllib.request.urlopen(f"http://{server}/history/{prompt_id}") as response:
        history = json.loads(response.read())[prompt_id]
    images: dict[str, list[bytes]] = {}
    for node_id, node_output in history["outputs"].items():
        for image in node_output.get("images", []):
            query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]})
            with urllib.request.urlopen(f"http://{server}/view?{query}") as response:
                images.setdefault(node_id, []).append(response.read())
    return prompt_id, images


def images_through_socket(server: str, checkpoint: str, *, wait_s: float) -> tuple[str, dict[str, list[bytes]]]:
    """(prompt id, {node: [image bytes]}) the way websockets_api_example_ws_images.py gets them."""
    client_id = str(uuid.uuid4())
    ws = connect(server, client_id, wait_s)
    images: dict[str, list[bytes]] = {}
    try:
        prompt_id = queue(server, "/api/prompt", graph(checkpoint, output="SaveImageWebsocket"), client_id)["prompt_id"]
        current_node = ""
        while True:
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                if message["type"] == "executing" and message["data"]["prompt_id"] == prompt_id:
                    if message["data"]["node"] is None:
                        break
                    current_node = message["data"]["node"]
            elif current_node == SOCKET_NODE:
                images.setdefault(current_node, []).append(out[8:])
    finally:
        ws.close()
    return prompt_id, images
