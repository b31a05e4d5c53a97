"""
`--key value` / `--key=value` command-line overrides of a config dict (train.py's `config`), typed like the
key's default. As nanoGPT's configurator.py: the config and its values live in the script, the parsing here.
Also the two things every script's command line needs: `one_line(error)` (an exception as a one-line
user message) and `resolve_device(name)` (what `--device auto` means).
"""
import sys


class ConfigError(ValueError):
    """A bad command line or config value; train.py prints it as a one-line error."""


def parse_value(key, text, default):
    """Turn a command-line string into the type of the key's default."""
    if isinstance(default, bool):
        if text.lower() in ('1', 'true', 'yes', 'on'):
            return True
        if text.lower() in ('0', 'false', 'no', 'off'):
            return False
        raise ConfigError(f"--{key} expects true/false, got {text!r}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--{key} expects an integer, got {text!r}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--{key} expects a number, got {text!r}") from None
    return text


def parse_overrides(argv, base):
    """`--key value` / `--key=value` -> {key: value typed like base[key]}."""
    overrides, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--'):
            raise ConfigError(f"unexpected argument {arg!r} (use --key value or --key=value)")
        key, eq, value = arg[2:].partition('=')
        key = key.replace('-', '_')
        if key not in base:
            raise ConfigError(f"unknown config key --{key} (--help lists them)")
        if not eq:
            if isinstance(base[key], bool) and (i + 1 == len(argv) or argv[i + 1].startswith('--')):
                value = 'true'  # a bare boolean flag: --resume
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise ConfigError(f"--{key} needs a value")
        overrides[key] = parse_value(key, value, base[key])
        i += 1
    return overrides


def given(argv, key):
    """Whether the command line sets --key itself (`--key v`, `--key=v`, dashes or underscores alike)."""
    return any(a.startswith('--') and a[2:].partition('=')[0].replace('-', '_') == key for a in argv)


def resolve(argv, config, recipes, base=None):
    """A training script's config: `config`, then the recipe of the dataset the command line asks for
    (recipes[name]: the keys it changes), then the command line's `--key value` overrides. With `base` (a
    resumed run's saved config, its recipe already applied) only the command line goes on top."""
    overrides = parse_overrides(argv, config if base is None else base)
    if base is not None:
        return {**base, **overrides}
    dataset = overrides.get('dataset', config['dataset'])
    if dataset not in recipes:
        raise ConfigError(f"--dataset must be one of {sorted(recipes)}, got {dataset!r}")
    return {**config, **recipes[dataset], **overrides}


def one_line(error):
    """Any exception as one line for a user-facing message: its text with line breaks and runs of
    spaces squeezed, or its class name when it has no text. An error raised inside a DataLoader
    worker arrives wrapped in a multi-line report whose last line is the original
    'module.Error: message'; that message is what is returned."""
    text = str(error)
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and 'Original Traceback' in text:
        text = lines[-1].split(': ', 1)[-1]
    return ' '.join(text.split()) or type(error).__name__


def resolve_device(name):
    """The device a `--device NAME` option means: 'auto' is the GPU when torch sees one, else the CPU; any
    other name is returned as given, after checking that a CUDA one can be had (ConfigError naming it)."""
    import torch  # here, so that parsing a command line does not need torch
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if str(name).startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available in this torch install")
    return name


def run_script(main, argv, errors=(ValueError, OSError, FloatingPointError)):
    """A script's `__main__`: main(argv). A user error (ConfigError and the other ValueErrors, missing or
    unreadable files, ...) is printed as one line `error: ...` and exits with status 1; a torchrun process group
    is torn down either way."""
    try:
        main(argv)
    except errors as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    finally:
        torch = sys.modules.get('torch')
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
