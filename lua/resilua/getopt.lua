--- resilua.getopt — the one option parser of the commands (resilua.cli,
-- resilua.proxy, resilua.plan) and of experiment scripts (resilua.experiment).
--
-- parse(args, first, spec, aliases): spec maps a long flag to "value",
-- "list" or "flag"; aliases maps another spelling ("-h") to it.  Reads
-- args[first..]; "--name=value" and "--name value" both work, "--" ends
-- the options.  Returns opts ({ [flag] = value | true | { values } }) and
-- the positional arguments, or nil and a message.
local function parse(args, first, spec, aliases)
  local opts, pos = {}, {}
  local i = first
  while i <= #args do
    local a = args[i]
    if a == "--" then
      for j = i + 1, #args do pos[#pos + 1] = args[j] end
      break
    elseif a:sub(1, 1) == "-" and a ~= "-" then
      local name, inline = a:match("^(%-%-[^=]+)=(.*)$")
      name = aliases[name or a] or name or a
      local kind = spec[name]
      if not kind then return nil, ("unknown option '%s'"):format(a) end
      local value
      if kind ~= "flag" then
        value = inline
        if not value then
          i = i + 1
          value = args[i]
          if value == nil then return nil, ("option '%s' needs a value"):format(a) end
        end
      elseif inline then
        return nil, ("option '%s' takes no value"):format(name)
      end
      if kind == "list" then
        opts[name] = opts[name] or {}
        table.insert(opts[name], value)
      else
        opts[name] = value or true
      end
    else
      pos[#pos + 1] = a
    end
    i = i + 1
  end
  return opts, pos
end

return parse
