"""The action runtime: the process that holds one action's user code and serves OpenWhisk's
/init and /run (and Knative's POST /). It never imports torch."""
