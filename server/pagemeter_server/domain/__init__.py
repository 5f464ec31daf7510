"""The rules' arithmetic and shapes: periods, plans, money, figures, errors. No gRPC, no Redis."""
