"""What `lorakit validate` checks before any compute: inputs, the trained tokens of real rows, memory and steps."""
