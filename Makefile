# Aeterna: the two commands a newcomer needs are `make demo` and `make test`.
# Both install (npm ci), build the addon and the TypeScript, then run.

NODE_MODULES := node_modules/.package-lock.json
ADDON := build/Release/aeterna.node

# The test tiers, listed from the sources (so a test file left over in dist/ from an older layout never runs).
# Node 20's `node --test` expands no globs itself: make lists the files.
# unit: no daemon (pure code, socketpairs, the addon), tens of seconds. daemon: a real Aeterna with real apps, by
# component. sdk: the client SDKs with their toolchains (Python, Go, Java). packaging: what users install (the
# self-contained build, the SDK packages, the images, an install without the addon). endurance: bench, compat, soak and the
# npm package, minutes each.
tests_in = $(patsubst %.ts,dist/%.js,$(sort $(shell find $(1) -name '*.test.ts')))
UNIT_TESTS := $(call tests_in,test/unit)
DAEMON_TESTS := $(call tests_in,test/daemon)
SDK_TESTS := $(call tests_in,test/sdk)
ENDURANCE_TESTS := $(call tests_in,test/endurance)
PACKAGING_TESTS := $(call tests_in,test/packaging)
# The slowest tiers first: the runner starts files in this order, so the short unit files fill the last slots instead
# of one long file running alone at the end.
TESTS ?= $(ENDURANCE_TESTS) $(SDK_TESTS) $(DAEMON_TESTS) $(PACKAGING_TESTS) $(UNIT_TESTS)
# Files run at once. Most daemon tests wait on processes, not on the CPU: 3 keep both cores busy.
TEST_CONCURRENCY ?= 3

.PHONY: all build demo lint format test test-unit test-fast test-packaging bench soak streams clean prebuild standalone java-sdk

all: build

$(NODE_MODULES): package.json package-lock.json
	npm ci
	@touch $@

# npm ci's install script (node-gyp-build) already builds the addon when no prebuilt one loads: node_modules is an
# order-only prerequisite, so a fresh install does not make the addon look stale and get built a second time. The
# addon is rebuilt when native/ or binding.gyp is newer than it, or when it is missing.
$(ADDON): $(wildcard native/*.cc native/*.h) binding.gyp | $(NODE_MODULES)
	npx node-gyp rebuild

build: $(NODE_MODULES) $(ADDON)
	npx tsc -p tsconfig.json

demo: build
	node bin/aeterna.js start -c examples/llm-agent/aeterna.yaml

# The TypeScript Aeterna's checks read: Prettier's format (.prettierrc.json) and ESLint with typescript-eslint's
# type-checked rules (eslint.config.mjs). Quoted globs: the tools expand them, the shell does not.
LINTED := 'src/**/*.ts' 'test/**/*.ts' 'bench/**/*.ts' 'scripts/**/*.ts'

lint: $(NODE_MODULES)
	npx prettier --check $(LINTED)
	npx eslint $(LINTED)

# Rewrites what `make lint` would refuse and can fix by itself.
format: $(NODE_MODULES)
	npx prettier --write --log-level warn $(LINTED)
	npx eslint --fix $(LINTED)

# `make test` lints, then runs every tier, and is what CI runs (.ci/run); `make test-unit` and `make test-fast` are
# the shorter loops while working.
test: lint build
	node --test --test-concurrency=$(TEST_CONCURRENCY) $(TESTS)

test-unit: build
	node --test --test-concurrency=$(TEST_CONCURRENCY) $(UNIT_TESTS)

test-fast: build
	node --test --test-concurrency=$(TEST_CONCURRENCY) $(UNIT_TESTS) $(DAEMON_TESTS) $(SDK_TESTS)

# What users install: the self-contained build, the SDK packages, the images, an install without the addon.
test-packaging: build
	node --test --test-concurrency=$(TEST_CONCURRENCY) $(PACKAGING_TESTS)

# Benchmarks against the alternatives (bench/README.md), then long-lived streams and WebSocket sessions across
# reloads (make streams), then several instances per generation against pm2 -i (bench/instances.ts); `make test`
# runs only the first's quick mode.
bench: build
	node dist/bench/run.js $(BENCH_ARGS)
	node dist/bench/streams.js $(STREAMS_ARGS)
	node dist/bench/instances.js $(INSTANCES_ARGS)

# The long reliability run: 1,000 reloads under load (CI runs a short version in the tests).
soak: build
	node dist/bench/soak.js $(SOAK_ARGS)

# Long-lived SSE streams across reloads: connection handoff beside the drain only and pm2 (bench/README.md).
streams: build
	node dist/bench/streams.js $(STREAMS_ARGS)

# The prebuilt addon for this platform (prebuilds/linux-x64/aeterna.glibc.node, prebuildify --napi), which the
# npm tarball ships so that installs need no compiler. Run it right before `npm pack` / `npm publish`.
# prebuildify builds in build/ and moves the result away: the next `make build` redoes the source build.
prebuild: $(NODE_MODULES)
	npm run build:prebuilds

# Aeterna as one self-contained executable (a Node single executable application with the addon inside) for this
# platform: build/standalone/aeterna, one file to copy into any image, no Node or npm there (scripts/standalone.ts;
# docs/operations.md, "Adding Aeterna to any image").
standalone: build
	node dist/scripts/standalone.js

# The Java SDK as a jar (clients/java; JDK 17+): build/java/aeterna-client.jar, its version in the manifest and
# the license inside. examples/java-hello compiles and runs against it.
VERSION := $(shell node -p "require('./package.json').version" 2>/dev/null)
JAVA_SDK_JAR := build/java/aeterna-client.jar

java-sdk: $(JAVA_SDK_JAR)

$(JAVA_SDK_JAR): clients/java/Aeterna.java LICENSE package.json
	rm -rf build/java/classes && mkdir -p build/java/classes/META-INF
	javac --release 17 -Xlint:all -Werror -d build/java/classes clients/java/Aeterna.java
	cp LICENSE build/java/classes/META-INF/LICENSE
	printf 'Implementation-Title: aeterna-client\nImplementation-Version: %s\nImplementation-License: Apache-2.0\nAutomatic-Module-Name: dev.aeterna\n' '$(VERSION)' > build/java/MANIFEST.MF
	jar --create --file $@.partial --manifest build/java/MANIFEST.MF -C build/java/classes .
	mv $@.partial $@

clean:
	rm -rf dist build
