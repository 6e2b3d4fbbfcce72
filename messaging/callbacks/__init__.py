"""Status callbacks to clients (issue 21): the outbox written with each event (outbox), its
delivery (delivery, signing), endpoints and their secrets (endpoints), dead callbacks (dead_letters).
docs/callbacks.md is the receiver's side."""
