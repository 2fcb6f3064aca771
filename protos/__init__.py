"""Wire protocol of fltui: federated.proto and admin.proto with their generated code."""
