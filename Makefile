# Aeterna: the two commands a newcomer needs are `make demo` and `make test`.
# Both install (npm ci), build the addon and the TypeScript, then run.

NODE_MODULES := node_modules/.package-lock.json
ADDON := build/Release/aeterna.node
TESTS ?= dist/test/*.test.js

.PHONY: all build demo test clean

all: build

$(NODE_MODULES): package.json package-lock.json
	npm ci
	@touch $@

$(ADDON): native/aeterna.cc binding.gyp $(NODE_MODULES)
	npx node-gyp rebuild

build: $(NODE_MODULES) $(ADDON)
	npx tsc -p tsconfig.json

demo: build
	node bin/aeterna.js start -c examples/demo/aeterna.yaml

test: build
	node --test --test-concurrency=2 $(TESTS)

clean:
	rm -rf dist build
