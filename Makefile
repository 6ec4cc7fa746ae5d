# The two commands of the README, on a fresh machine with python3, git, make and apt:
#   make demo            set up (offline Fashion-MNIST, .venv), then the paper's pipeline end to end (~10 CPU minutes)
#   make demo FULL=1     the paper's full setting instead: ResNet-18 on CIFAR-10, on a GPU (downloads CIFAR-10)
#   make test            set up (with KServe and the Triton client), then the whole test suite
# Both skip what is already done; the scripts they run say what each step does.
.PHONY: demo test setup

setup:
	scripts/setup.sh

demo:
	scripts/demo.sh

test:
	scripts/test.sh
