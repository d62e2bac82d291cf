"""What tests and benches share: certificates, tiny models, in-process and subprocess servers, load, fuzz cases."""
