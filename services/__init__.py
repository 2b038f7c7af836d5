"""gRPC servers and clients (installed as diredi_secure.services): thin, map errors to status codes."""
