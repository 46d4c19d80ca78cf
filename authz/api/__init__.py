"""The sidecar's own gRPC API (tokenfactory.keys.v1): generated code lives in `gen/`."""
