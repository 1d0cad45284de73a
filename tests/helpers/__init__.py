"""What several test modules share: the parts as real processes, the in-loop service, reads of the APIs,
ComfyUI's graphs and flows, deploy/ as data. Test modules import from here, never from each other."""
