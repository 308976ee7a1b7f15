module aeterna.dev/examples/go-counter

go 1.19

require aeterna.dev/client v0.1.0

replace aeterna.dev/client => ../../clients/go
