# Aeterna: the two commands a newcomer needs are `make demo` and `make test`.
# Both install (npm ci), build the addon and the TypeScript, then run.

NODE_MODULES := node_modules/.package-lock.json
ADDON := build/Release/aeterna.node
TESTS ?= dist/test/*.test.js

.PHONY: all build demo test bench soak clean prebuild

all: build

$(NODE_MODULES): package.json package-lock.json
	npm ci
	@touch $@

$(ADDON): $(wildcard native/*.cc native/*.h) binding.gyp $(NODE_MODULES)
	npx node-gyp rebuild

build: $(NODE_MODULES) $(ADDON)
	npx tsc -p tsconfig.json

demo: build
	node bin/aeterna.js start -c examples/llm-agent/aeterna.yaml

test: build
	node --test --test-concurrency=2 $(TESTS)

# Benchmarks against the alternatives (bench/README.md); not part of `make test`.
bench: build
	node dist/bench/run.js $(BENCH_ARGS)

# The long reliability run: 1,000 reloads under load (CI runs a short version in the tests).
soak: build
	node dist/bench/soak.js $(SOAK_ARGS)

# The prebuilt addon for this platform (prebuilds/linux-x64/aeterna.glibc.node, prebuildify --napi), which the
# npm tarball ships so that installs need no compiler. Run it right before `npm pack` / `npm publish`.
# prebuildify builds in build/ and moves the result away: the next `make build` redoes the source build.
prebuild: $(NODE_MODULES)
	npm run build:prebuilds

clean:
	rm -rf dist build
