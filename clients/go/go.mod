module aeterna.dev/client

go 1.19
